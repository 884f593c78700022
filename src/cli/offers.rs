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
/// What a catalog cloud (Lambda, RunPod) would rent now for `resources` on
/// `placement`, in the order its create tries them (the placement's types as written,
/// else cheapest first): the line `apply --dry-run` shows. `None` for other providers.
pub(super) fn would_take(
    home: &Home,
    resources: &Resources,
    placement: &Placement,
) -> Option<Result<Option<String>, super::CliError>> {
    let kind = placement.provider;
    if !matches!(kind, ProviderKind::Lambda | ProviderKind::Runpod) {
        return None;
    }
    let look = || -> Result<Option<String>, super::CliError> {
        let pool = crate::transport::ssh::SshPool::new(home.clone())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (offers, order) = if kind == ProviderKind::Lambda {
            let key = crate::provider::lambda::KEY_NAME;
            let p = crate::provider::lambda::LambdaProvider::from_home(home, pool)?
                .ok_or_else(|| fail(format!("no {key} stored")))?;
            (
                runtime.block_on(p.offers(resources, placement))?,
                placement.instance_types.clone(),
            )
        } else {
            let key = crate::provider::runpod::KEY_NAME;
            let p = crate::provider::runpod::RunpodProvider::from_home(home, pool)?
                .ok_or_else(|| fail(format!("no {key} stored")))?;
            let names = if placement.instance_types.is_empty() {
                resources
                    .gpu
                    .as_ref()
                    .map(|g| g.names.clone())
                    .unwrap_or_default()
            } else {
                placement.instance_types.clone()
            };
            let offers = runtime.block_on(p.offers(resources, placement))?;
            // Names as users write them, resolved to the ids the catalog lists.
            let ids = names
                .iter()
                .flat_map(|n| {
                    offers
                        .iter()
                        .filter(|o| {
                            crate::provider::runpod::gpu_matches(
                                &crate::provider::runpod::GpuType {
                                    id: o.id.clone(),
                                    name: o.gpu.clone(),
                                    memory_gb: 0.0,
                                    secure_price: None,
                                    community_price: None,
                                    availability: String::new(),
                                },
                                n,
                            )
                        })
                        .map(|o| o.id.clone())
                        .collect::<Vec<_>>()
                })
                .collect();
            (offers, ids)
        };
        let usable = |o: &&crate::provider::cloud::CatalogOffer| {
            o.available
                && (kind != ProviderKind::Lambda
                    || placement.regions.is_empty()
                    || o.regions.iter().any(|r| placement.regions.contains(r)))
        };
        // `offers` is cheapest first: without an order that is the create's order too.
        let first = if order.is_empty() {
            offers.iter().find(usable)
        } else {
            order
                .iter()
                .find_map(|id| offers.iter().filter(usable).find(|o| &o.id == id))
        };
        Ok(first.map(|o| {
            let regions: Vec<&String> = o
                .regions
                .iter()
                .filter(|r| placement.regions.is_empty() || placement.regions.contains(r))
                .collect();
            let at = match regions.first() {
                Some(r) => format!(" in {r}"),
                None => String::new(),
            };
            format!(
                "{} ({}x {}){at} at ${:.2}/h",
                o.id, o.count, o.gpu, o.price_per_hour
            )
        }))
    };
    Some(look())
}

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
