//! `asimov offers`: what the providers would rent now for a job's resources (from
//! `-f job.yaml` or flags), as a table sorted by price (or DL performance per dollar),
//! or as JSON `{"items": [...]}` for scripts: Vast's offers, Lambda's instance types,
//! RunPod's GPU types.

use super::args::{OfferSort, Output};
use super::{CliResult, desired, fail, render};
use crate::home::Home;
use crate::manifest::{self, GpuRequest, Placement, Resources};
use crate::model::ProviderKind;
use crate::provider::vast::{VastOffer, VastProvider};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;

/// What to search for, as the flags say it.
pub struct Query {
    pub file: Option<PathBuf>,
    pub provider: Option<String>,
    pub gpus: Vec<String>,
    pub count: Option<u32>,
    pub min_vram: Option<u32>,
    pub max_price: Option<f64>,
    pub filters: Vec<String>,
    pub spot: bool,
    /// Percent over the price: the bid (spot) or the cap `--pick` writes.
    pub premium: Option<f64>,
    /// Choose one offer on the terminal and print its placement entry.
    pub pick: bool,
}

/// The resources and the Vast placement to search with: the job's (flags override),
/// else the flags alone.
fn resolve(home: &Home, q: &Query) -> Result<(Resources, Placement), super::CliError> {
    resolve_for(home, q, ProviderKind::Vast)
}

fn resolve_for(
    home: &Home,
    q: &Query,
    kind: ProviderKind,
) -> Result<(Resources, Placement), super::CliError> {
    let mut resources = Resources::default();
    let mut placement = Placement {
        provider: kind,
        ..Placement::local()
    };
    if let Some(file) = &q.file {
        let current = desired::load_current(home).unwrap_or_default();
        let ctx = desired::context(home, &current);
        let loaded = manifest::load_paths(std::slice::from_ref(file), &ctx)?;
        let job = loaded
            .manifests
            .jobs
            .first()
            .ok_or_else(|| fail(format!("{} defines no Job", file.display())))?;
        resources = job.spec.resources.clone();
        if let Some(p) = job.spec.placement.iter().find(|p| p.provider == kind) {
            placement = p.clone();
        }
    }
    if !q.gpus.is_empty() || q.count.is_some() || q.min_vram.is_some() {
        let old = resources.gpu.take();
        resources.gpu = Some(GpuRequest {
            names: if q.gpus.is_empty() {
                old.as_ref().map(|g| g.names.clone()).unwrap_or_default()
            } else {
                q.gpus.clone()
            },
            count: q.count.or(old.as_ref().map(|g| g.count)).unwrap_or(1),
            min_vram_gb: q.min_vram.or(old.as_ref().and_then(|g| g.min_vram_gb)),
        });
    }
    if resources.gpu.is_none() {
        // Without a GPU request a GPU market lists everything; one GPU is the common ask.
        resources.gpu = Some(GpuRequest {
            names: Vec::new(),
            count: 1,
            min_vram_gb: None,
        });
    }
    if q.max_price.is_some() {
        placement.max_price_per_hour = q.max_price;
    }
    if q.spot {
        placement.spot = true;
    }
    if let Some(pct) = q.premium {
        if !pct.is_finite() || pct < 0.0 {
            return Err(fail(format!(
                "bad --premium {pct}: expected a percent, 0 or more"
            )));
        }
        placement.premium_pct = Some(pct);
    }
    for f in &q.filters {
        let Some((name, expr)) = f.split_once('=') else {
            return Err(fail(format!(
                "bad --filter {f:?}: expected FIELD=EXPR, like reliability=>=0.98"
            )));
        };
        placement
            .filters
            .insert(name.trim().to_string(), expr.trim().to_string());
    }
    Ok((resources, placement))
}

fn perf_per_dollar(o: &VastOffer, p: &Placement) -> f64 {
    let price = o.price(p);
    match o.dlperf {
        Some(perf) if price > 0.0 => perf / price,
        _ => 0.0,
    }
}

pub fn run(home: &Home, q: Query, sort: OfferSort, output: Output) -> CliResult {
    match q.provider.as_deref() {
        None | Some("vast") => {}
        Some("lambda") => return catalog(home, &q, ProviderKind::Lambda, output),
        Some("runpod") => return catalog(home, &q, ProviderKind::Runpod, output),
        Some(p) => {
            return Err(fail(format!(
                "provider {p} cannot be searched: expected vast, lambda or runpod"
            )));
        }
    }
    let (resources, placement) = resolve(home, &q)?;
    let provider = VastProvider::searcher(home)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut offers = runtime.block_on(provider.search(&resources, &placement))?;
    if sort == OfferSort::PerfPerDollar {
        offers.sort_by(|a, b| {
            perf_per_dollar(b, &placement)
                .partial_cmp(&perf_per_dollar(a, &placement))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    }
    if q.pick {
        return pick(&offers, &placement);
    }
    match output {
        Output::Json | Output::Yaml => {
            let items: Vec<serde_json::Value> = offers
                .iter()
                .map(|o| {
                    json!({
                        "provider": "vast",
                        "id": o.id.to_string(),
                        "gpu": o.gpu_name,
                        "count": o.num_gpus,
                        "vram_gb": o.vram_gb,
                        "price_per_hour": o.price(&placement),
                        "cuda": o.cuda,
                        "disk_gb": o.disk_gb,
                        "reliability": o.reliability,
                        "location": o.geolocation,
                        "dlperf": o.dlperf,
                        "verified": o.verified,
                        "storage_cost": o.storage_cost,
                        "inet_up_cost": o.inet_up_cost,
                        "inet_down_cost": o.inet_down_cost,
                        "spot": placement.spot,
                    })
                })
                .collect();
            let doc = json!({ "items": items });
            if output == Output::Yaml {
                print!("{}", manifest::to_yaml_string(&doc)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
        }
        Output::Table | Output::Wide => {
            let mut table = render::new_table(&[
                "PROVIDER", "ID", "GPU", "COUNT", "VRAM", "$/H", "CUDA", "DISK", "RELIAB.",
                "LOCATION",
            ]);
            for o in &offers {
                table.add_row(vec![
                    "vast".to_string(),
                    o.id.to_string(),
                    o.gpu_name.clone(),
                    o.num_gpus.to_string(),
                    format!("{:.0} GB", o.vram_gb),
                    format!("{:.3}", o.price(&placement)),
                    o.cuda.map_or("-".into(), |c| format!("{c:.1}")),
                    o.disk_gb.map_or("-".into(), |d| format!("{d:.0} GB")),
                    o.reliability.map_or("-".into(), |r| format!("{r:.3}")),
                    o.geolocation.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            if offers.is_empty() {
                eprintln!("no offer fits");
            } else {
                println!("{table}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `offers --provider lambda|runpod`: the cloud's catalog (instance types, GPU types)
/// that fits, cheapest first, in the same JSON shape as Vast's offers.
fn catalog(home: &Home, q: &Query, kind: ProviderKind, output: Output) -> CliResult {
    let (resources, placement) = resolve_for(home, q, kind)?;
    let pool = crate::transport::ssh::SshPool::new(home.clone())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let offers = match kind {
        ProviderKind::Lambda => {
            let key = crate::provider::lambda::KEY_NAME;
            let p = crate::provider::lambda::LambdaProvider::from_home(home, pool)?
                .ok_or_else(|| fail(format!("no {key} stored: asimov secret set {key}")))?;
            runtime.block_on(p.offers(&resources, &placement))?
        }
        _ => {
            let key = crate::provider::runpod::KEY_NAME;
            let p = crate::provider::runpod::RunpodProvider::from_home(home, pool)?
                .ok_or_else(|| fail(format!("no {key} stored: asimov secret set {key}")))?;
            runtime.block_on(p.offers(&resources, &placement))?
        }
    };
    match output {
        Output::Json | Output::Yaml => {
            let items: Vec<serde_json::Value> = offers
                .iter()
                .map(|o| {
                    json!({
                        "provider": kind.as_str(),
                        "id": o.id,
                        "gpu": o.gpu,
                        "count": o.count,
                        "vram_gb": o.vram_gb,
                        "price_per_hour": o.price_per_hour,
                        "available": o.available,
                        "regions": o.regions,
                    })
                })
                .collect();
            let doc = json!({ "items": items });
            if output == Output::Yaml {
                print!("{}", manifest::to_yaml_string(&doc)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
        }
        Output::Table | Output::Wide => {
            let mut table = render::new_table(&[
                "PROVIDER",
                "ID",
                "GPU",
                "COUNT",
                "VRAM",
                "$/H",
                "AVAILABLE",
                "REGIONS",
            ]);
            for o in &offers {
                table.add_row(vec![
                    kind.as_str().to_string(),
                    o.id.clone(),
                    o.gpu.clone(),
                    o.count.to_string(),
                    o.vram_gb.map_or("-".into(), |v| format!("{v:.0} GB")),
                    format!("{:.3}", o.price_per_hour),
                    if o.available { "yes" } else { "no" }.to_string(),
                    if o.regions.is_empty() {
                        "-".to_string()
                    } else {
                        o.regions.join(",")
                    },
                ]);
            }
            if offers.is_empty() {
                eprintln!("no offer fits");
            } else {
                println!("{table}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// For `apply --dry-run`: what a job placed on Vast by `placement` would rent now (the
/// cheapest fitting offer and its price per hour), or why nothing. Searches only.
pub fn vast_quote(home: &Home, resources: &Resources, placement: &Placement) -> String {
    let search = || -> Result<Option<VastOffer>, Box<dyn std::error::Error>> {
        // A preview: a few seconds of retries, not the controller's minute and a half.
        let provider = VastProvider::searcher(home)?.with_retry(
            crate::retry::Backoff::new(
                std::time::Duration::from_millis(500),
                std::time::Duration::from_secs(2),
                2.0,
            )
            .with_max_elapsed(Some(std::time::Duration::from_secs(5))),
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let offers = runtime.block_on(provider.search(resources, placement))?;
        Ok(offers.into_iter().next())
    };
    match search() {
        Ok(Some(o)) => format!(
            "offer {} ({}x {}, {:.0} GB) at ${:.4}/h{}",
            o.id,
            o.num_gpus,
            o.gpu_name,
            o.vram_gb,
            o.price(placement),
            if placement.spot { " (bid)" } else { "" }
        ),
        Ok(None) => "no offer fits now".to_string(),
        Err(e) => format!("cannot search offers: {e}"),
    }
}

/// `offers --pick`: one offer chosen on the terminal (inquire's list: arrow keys, typing
/// filters), printed as the `placement` entry that rents that machine: its
/// `machine_id`, the GPU, and the price (`--spot`: the bid, `premium_pct` over the
/// minimum; else a cap of `--premium` percent over today's price, or today's price).
fn pick(offers: &[VastOffer], placement: &Placement) -> CliResult {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        return Err(fail(
            "offers --pick needs a terminal; use -o json to choose in a script",
        ));
    }
    if offers.is_empty() {
        return Err(fail("no offer fits; nothing to pick"));
    }
    let lines: Vec<String> = offers
        .iter()
        .map(|o| {
            format!(
                "{:>9}  {}x {:<12} {:>4.0} GB  ${:>8.4}/h  reliab. {}  {}",
                o.id,
                o.num_gpus,
                o.gpu_name,
                o.vram_gb,
                o.price(placement),
                o.reliability.map_or("-".into(), |r| format!("{r:.3}")),
                o.geolocation.clone().unwrap_or_else(|| "-".into()),
            )
        })
        .collect();
    let chosen = inquire::Select::new("Offer to rent (type to filter):", lines.clone())
        .with_page_size(15)
        .prompt();
    let line = match chosen {
        Ok(line) => line,
        Err(inquire::InquireError::OperationCanceled)
        | Err(inquire::InquireError::OperationInterrupted) => {
            return Err(fail("nothing picked"));
        }
        Err(e) => return Err(fail(format!("offers --pick: {e}"))),
    };
    let Some(o) = lines
        .iter()
        .position(|l| *l == line)
        .and_then(|i| offers.get(i))
    else {
        return Err(fail("offers --pick: the choice is not in the list"));
    };
    println!("{}", placement_entry(o, placement));
    Ok(ExitCode::SUCCESS)
}

/// The job's `placement` entry (YAML flow style) that rents the machine of `o`.
fn placement_entry(o: &VastOffer, placement: &Placement) -> String {
    let mut filters = Vec::new();
    if let Some(m) = o.machine_id {
        filters.push(format!("machine_id: \"={m}\""));
    }
    filters.push(format!("gpu_name: \"={}\"", o.gpu_name.replace(' ', "_")));
    let price = if placement.spot {
        format!(
            "spot: true, premium_pct: {}",
            placement.premium_pct.unwrap_or(0.0)
        )
    } else {
        let cap = o.price(placement) * (1.0 + placement.premium_pct.unwrap_or(0.0) / 100.0);
        format!(
            "max_price_per_hour: {:.4}",
            (cap * 10_000.0).ceil() / 10_000.0
        )
    };
    format!(
        "placement:\n  - {{provider: vast, {price}, filters: {{{}}}}}  # offer {}: {}x {}, ${:.4}/h now",
        filters.join(", "),
        o.id,
        o.num_gpus,
        o.gpu_name,
        o.price(placement)
    )
}
