//! `asimov offers`: what the providers would rent now for a job's resources (from
//! `-f job.yaml` or flags), as a table sorted by price (or DL performance per dollar),
//! or as JSON `{"items": [...]}` for scripts: Vast's offers, Lambda's instance types,
//! RunPod's GPU types. Without `--provider`, every configured cloud at once, merged;
//! `--pick` chooses one on a terminal (`pick.rs`). `search` is also what
//! `apply --dry-run` asks.

use super::args::{OfferSort, Output};
use super::{CliError, CliResult, desired, fail, render};
use crate::home::Home;
use crate::manifest::{self, GpuRequest, Placement, Resources};
use crate::model::{Offer, ProviderKind, Secret, Usd};
use crate::provider::cloud;
use crate::provider::lambda::LambdaProvider;
use crate::provider::runpod::RunpodProvider;
use crate::provider::vast::{self, VastProvider};
use crate::retry::Backoff;
use crate::transport::ssh::SshPool;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

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
    /// Choose one offer on a terminal and print (or `write`) its placement entry.
    pub pick: bool,
    /// With `pick`: percent over the offer's price, as the bid (spot) or price cap.
    pub premium: Option<f64>,
    /// With `pick`: write the entry into the `-f` job file.
    pub write: bool,
}

/// The resources and the placement of `kind` to search with: the job's (flags
/// override), else the flags alone.
pub fn resolve_for(
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

/// One offer as `asimov offers` lists it, `--pick` chooses it and `apply --dry-run`
/// takes it: the shared model (priced as the placement would pay), and the JSON item.
#[derive(Debug, Clone)]
pub struct Found {
    pub offer: Offer,
    /// Rentable now (a catalog type may be listed without capacity).
    pub available: bool,
    pub dlperf: Option<f64>,
    /// The placement searched with (spot, filters), which `--pick` builds on.
    pub placement: Placement,
    pub item: serde_json::Value,
}

/// The clouds `offers` can search.
pub const CLOUDS: [ProviderKind; 3] = [
    ProviderKind::Vast,
    ProviderKind::Lambda,
    ProviderKind::Runpod,
];

/// The clouds with an API key in the credential store or this process's environment.
pub fn configured_clouds(home: &Home) -> Vec<ProviderKind> {
    CLOUDS
        .into_iter()
        .filter(|k| key_name(*k).is_some_and(|name| cloud::api_key(home, name).is_some()))
        .collect()
}

/// The credential-store name of a cloud's API key.
pub fn key_name(kind: ProviderKind) -> Option<&'static str> {
    match kind {
        ProviderKind::Vast => Some(crate::provider::vast::KEY_NAME),
        ProviderKind::Lambda => Some(crate::provider::lambda::KEY_NAME),
        ProviderKind::Runpod => Some(crate::provider::runpod::KEY_NAME),
        ProviderKind::Local | ProviderKind::Ssh | ProviderKind::Fake => None,
    }
}

/// A search is one command's wait, not a controller's: give up on a failing API after
/// seconds, not the controller's minute and a half.
fn search_retry() -> Backoff {
    Backoff::new(Duration::from_millis(300), Duration::from_secs(3), 2.0)
        .with_max_elapsed(Some(Duration::from_secs(8)))
}

/// What `kind` would rent now for `resources` under `placement`, in the order its
/// create tries them: the same search the create makes (Vast's filters and bid price,
/// Lambda's and RunPod's catalogs), nothing rented. Vast answers without a key; the
/// catalog clouds need theirs.
pub async fn search(
    home: &Home,
    pool: &Arc<SshPool>,
    kind: ProviderKind,
    resources: &Resources,
    placement: &Placement,
) -> Result<Vec<Found>, CliError> {
    let no_key = |name: &str| {
        fail(format!(
            "no {name} stored: asimov login {kind}, or asimov secret set {name}"
        ))
    };
    match kind {
        ProviderKind::Vast => {
            let key = vast::api_key(home).unwrap_or_else(|| Secret::new(""));
            let p = VastProvider::new(
                home,
                Arc::clone(pool),
                vast::api_url(),
                key,
                vast::Pacing::from_env(),
            )?
            .with_retry(search_retry());
            let offers = p.search(resources, placement).await?;
            Ok(offers
                .iter()
                .map(|o| Found {
                    offer: o.to_offer(placement),
                    available: true,
                    dlperf: o.dlperf,
                    placement: placement.clone(),
                    item: json!({
                        "provider": "vast",
                        "id": o.id.to_string(),
                        "gpu": o.gpu_name,
                        "count": o.num_gpus,
                        "vram_gb": o.vram_gb,
                        "price_per_hour": o.price(placement),
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
                        "available": true,
                    }),
                })
                .collect())
        }
        ProviderKind::Lambda | ProviderKind::Runpod => {
            let mut catalog = if kind == ProviderKind::Lambda {
                let p = LambdaProvider::from_home(home, Arc::clone(pool))?
                    .ok_or_else(|| no_key(crate::provider::lambda::KEY_NAME))?
                    .with_retry(search_retry());
                let mut types = p.offers(resources, placement).await?;
                // A launch goes only to the placement's regions: capacity elsewhere
                // does not count.
                if !placement.regions.is_empty() {
                    for t in &mut types {
                        t.regions.retain(|r| placement.regions.contains(r));
                        t.available = !t.regions.is_empty();
                    }
                }
                types
            } else {
                let p = RunpodProvider::from_home(home, Arc::clone(pool))?
                    .ok_or_else(|| no_key(crate::provider::runpod::KEY_NAME))?
                    .with_retry(search_retry());
                p.offers(resources, placement).await?
            };
            // A create tries what the placement names (its instance types; for RunPod
            // also the job's GPU names) in that order, and only the rest by price.
            let wanted: Vec<String> = if !placement.instance_types.is_empty() {
                placement.instance_types.clone()
            } else if kind == ProviderKind::Runpod {
                resources
                    .gpu
                    .as_ref()
                    .map(|g| g.names.clone())
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            if !wanted.is_empty() {
                let rank = |o: &cloud::CatalogOffer| {
                    wanted
                        .iter()
                        .position(|w| match kind {
                            ProviderKind::Runpod => crate::provider::runpod::gpu_matches(
                                &crate::provider::runpod::GpuType {
                                    id: o.id.clone(),
                                    name: o.gpu.clone(),
                                    memory_gb: o.vram_gb.unwrap_or(0.0),
                                    secure_price: None,
                                    community_price: None,
                                    availability: String::new(),
                                },
                                w,
                            ),
                            _ => &o.id == w,
                        })
                        .unwrap_or(usize::MAX)
                };
                // Stable: the same rank stays cheapest first.
                catalog.sort_by_key(rank);
            }
            Ok(catalog
                .into_iter()
                .map(|o| {
                    let mut offer =
                        Offer::new(kind, o.id.clone(), Usd::from_dollars(o.price_per_hour));
                    offer.gpu = (!o.gpu.is_empty()).then(|| o.gpu.clone());
                    offer.count = o.count;
                    offer.vram_gb = o.vram_gb;
                    offer.location = (!o.regions.is_empty()).then(|| o.regions.join(","));
                    Found {
                        item: json!({
                            "provider": kind.as_str(),
                            "id": o.id,
                            "gpu": o.gpu,
                            "count": o.count,
                            "vram_gb": o.vram_gb,
                            "price_per_hour": o.price_per_hour,
                            "available": o.available,
                            "regions": o.regions,
                        }),
                        offer,
                        available: o.available,
                        dlperf: None,
                        placement: placement.clone(),
                    }
                })
                .collect())
        }
        ProviderKind::Local | ProviderKind::Ssh | ProviderKind::Fake => Err(fail(format!(
            "provider {kind} cannot be searched: expected vast, lambda or runpod"
        ))),
    }
}

fn perf_per_dollar(f: &Found) -> f64 {
    let price = f.offer.price_per_hour.dollars();
    match f.dlperf {
        Some(perf) if price > 0.0 => perf / price,
        _ => 0.0,
    }
}

/// The clouds a search without `--provider` asks: those configured (a key stored or
/// in the environment), narrowed to the clouds the job places on when `-f` gives one;
/// Vast, whose search needs no key, when nothing else is configured.
fn clouds_to_search(home: &Home, q: &Query) -> Result<Vec<ProviderKind>, CliError> {
    if let Some(p) = q.provider.as_deref() {
        return match CLOUDS.into_iter().find(|k| k.as_str() == p) {
            Some(k) => Ok(vec![k]),
            None => Err(fail(format!(
                "provider {p} cannot be searched: expected vast, lambda or runpod"
            ))),
        };
    }
    let mut kinds = configured_clouds(home);
    if let Some(placed) = job_clouds(home, q)? {
        kinds.retain(|k| placed.contains(k));
        if kinds.is_empty() && placed.contains(&ProviderKind::Vast) {
            kinds.push(ProviderKind::Vast);
        }
        if kinds.is_empty() {
            let names: Vec<&str> = placed.iter().map(|k| k.as_str()).collect();
            return Err(fail(format!(
                "no key is configured for {} (asimov login {})",
                names.join(", "),
                names.first().copied().unwrap_or("vast")
            )));
        }
    } else if kinds.is_empty() {
        eprintln!(
            "note: no cloud key is configured (asimov login vast|lambda|runpod); \
             searching vast, which answers without one"
        );
        kinds.push(ProviderKind::Vast);
    }
    Ok(kinds)
}

/// The clouds the `-f` job places on, when it names any.
fn job_clouds(home: &Home, q: &Query) -> Result<Option<Vec<ProviderKind>>, CliError> {
    let Some(file) = &q.file else {
        return Ok(None);
    };
    let current = desired::load_current(home).unwrap_or_default();
    let ctx = desired::context(home, &current);
    let loaded = manifest::load_paths(std::slice::from_ref(file), &ctx)?;
    let placed: Vec<ProviderKind> = loaded
        .manifests
        .jobs
        .first()
        .map(|j| {
            j.spec
                .placement
                .iter()
                .map(|p| p.provider)
                .filter(|k| CLOUDS.contains(k))
                .collect()
        })
        .unwrap_or_default();
    Ok((!placed.is_empty()).then_some(placed))
}

/// Searches every cloud of `kinds` at once; a cloud that fails is reported on stderr
/// and the others' offers kept. Fails only when every cloud failed.
fn search_all(home: &Home, q: &Query, kinds: &[ProviderKind]) -> Result<Vec<Found>, CliError> {
    let mut asks = Vec::new();
    for kind in kinds {
        let (resources, placement) = resolve_for(home, q, *kind)?;
        asks.push((*kind, resources, placement));
    }
    let pool = SshPool::new(home.clone())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let results = runtime
        .block_on(futures_util::future::join_all(asks.iter().map(
            |(kind, resources, placement)| search(home, &pool, *kind, resources, placement),
        )));
    let mut found = Vec::new();
    let mut failures = Vec::new();
    for ((kind, _, _), result) in asks.iter().zip(results) {
        match result {
            Ok(offers) => found.extend(offers),
            Err(e) => failures.push((*kind, e)),
        }
    }
    if failures.len() == kinds.len()
        && let Some((_, e)) = failures.pop()
    {
        for (kind, e) in &failures {
            eprintln!("warning: {kind}: {}", super::chain(e.as_ref()));
        }
        return Err(e);
    }
    for (kind, e) in &failures {
        eprintln!(
            "warning: {kind}: {}; showing the other clouds' offers",
            super::chain(e.as_ref())
        );
    }
    sort_found(&mut found, OfferSort::Price);
    Ok(found)
}

/// Cheapest first (then provider and id, for a stable order), or best DL performance
/// per dollar first.
fn sort_found(found: &mut [Found], sort: OfferSort) {
    found.sort_by(|a, b| {
        let by = match sort {
            OfferSort::Price => a.offer.price_per_hour.cmp(&b.offer.price_per_hour),
            OfferSort::PerfPerDollar => perf_per_dollar(b)
                .partial_cmp(&perf_per_dollar(a))
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.offer.price_per_hour.cmp(&b.offer.price_per_hour)),
        };
        by.then(a.offer.provider.cmp(&b.offer.provider))
            .then(a.offer.id.cmp(&b.offer.id))
    });
}

pub fn run(home: &Home, q: Query, sort: OfferSort, output: Output) -> CliResult {
    if (q.write || q.premium.is_some()) && !q.pick {
        return Err(fail("--write and --premium go with --pick"));
    }
    if q.write && q.file.is_none() {
        return Err(fail(
            "--write needs the job file to write into: -f job.yaml",
        ));
    }
    if q.pick && !super::prompt::on_terminal() {
        return Err(fail(
            "`asimov offers --pick` asks on a terminal; without one, list the offers with \
             `asimov offers -o json` and write the placement yourself",
        ));
    }
    let kinds = clouds_to_search(home, &q)?;
    let mut found = search_all(home, &q, &kinds)?;
    sort_found(&mut found, sort);
    if q.pick {
        return super::pick::run(home, &q, found);
    }
    match output {
        Output::Json | Output::Yaml => {
            let items: Vec<&serde_json::Value> = found.iter().map(|f| &f.item).collect();
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
                "CUDA",
                "DISK",
                "RELIAB.",
                "LOCATION",
                "AVAILABLE",
            ]);
            for f in &found {
                let o = &f.offer;
                table.add_row(vec![
                    o.provider.as_str().to_string(),
                    o.id.clone(),
                    o.gpu.clone().unwrap_or_else(|| "-".into()),
                    o.count.to_string(),
                    o.vram_gb.map_or("-".into(), |v| format!("{v:.0} GB")),
                    format!("{:.3}", o.price_per_hour.dollars()),
                    o.cuda.clone().unwrap_or_else(|| "-".into()),
                    o.disk_gb.map_or("-".into(), |d| format!("{d:.0} GB")),
                    o.reliability.map_or("-".into(), |r| format!("{r:.3}")),
                    o.location.clone().unwrap_or_else(|| "-".into()),
                    if f.available { "yes" } else { "no" }.to_string(),
                ]);
            }
            if found.is_empty() {
                eprintln!("no offer fits");
            } else {
                println!("{table}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
