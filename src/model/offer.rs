//! What a provider can rent out now: the one type `asimov offers`, price caps and the
//! budget projection before a create all read.

use super::{ProviderKind, Usd};
use serde::Serialize;

/// One thing a provider would rent now: a market offer (Vast), an instance type with
/// capacity (Lambda, RunPod), or a machine of a fixed pool (local, an ssh fleet host).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Offer {
    pub provider: ProviderKind,
    /// The provider's own id of the offer or instance type (`12345`, `gpu_1x_h100_pcie`,
    /// `lab/box-1`): what a create names.
    pub id: String,
    /// GPU model as the provider names it (`H100 PCIe`, `RTX 4090`); `None` for no GPU.
    pub gpu: Option<String>,
    /// GPUs in the offer (0 for a CPU machine).
    pub count: u32,
    /// Memory of one GPU.
    pub vram_gb: Option<f64>,
    /// Total price per hour of the whole offer (all its GPUs), as it would bill.
    pub price_per_hour: Usd,
    /// Highest CUDA version the driver supports (`12.4`).
    pub cuda: Option<String>,
    pub disk_gb: Option<f64>,
    /// The provider's reliability score in 0..=1.
    pub reliability: Option<f64>,
    /// Region, country or host name.
    pub location: Option<String>,
    /// Extra charges as the market lists them (`storage_cost`, `inet_up_cost`,
    /// `inet_down_cost`), dollars per unit the provider names.
    pub extra: Vec<(String, f64)>,
}

impl Offer {
    /// An offer with only its identity and price; the rest unknown.
    pub fn new(provider: ProviderKind, id: impl Into<String>, price_per_hour: Usd) -> Offer {
        Offer {
            provider,
            id: id.into(),
            gpu: None,
            count: 0,
            vram_gb: None,
            price_per_hour,
            cuda: None,
            disk_gb: None,
            reliability: None,
            location: None,
            extra: Vec::new(),
        }
    }
}

/// What offers to list; every field narrows, `Default` lists everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OfferQuery {
    /// GPU names as users write them (`H100` matches every H100 variant); any of these.
    pub gpus: Vec<String>,
    /// At least this many GPUs.
    pub min_count: Option<u32>,
    pub min_vram_gb: Option<f64>,
    pub max_price_per_hour: Option<Usd>,
}

impl OfferQuery {
    /// True when `offer` passes every filter. GPU names match ignoring case, spaces,
    /// dashes and underscores, by substring (`RTX_4090` matches `GeForce RTX 4090`).
    pub fn matches(&self, offer: &Offer) -> bool {
        let norm = |s: &str| -> String {
            s.chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .map(|c| c.to_ascii_lowercase())
                .collect()
        };
        let gpu_ok = self.gpus.is_empty()
            || offer.gpu.as_deref().is_some_and(|have| {
                let have = norm(have);
                self.gpus.iter().any(|want| have.contains(&norm(want)))
            });
        gpu_ok
            && self.min_count.is_none_or(|n| offer.count >= n)
            && self
                .min_vram_gb
                .is_none_or(|v| offer.vram_gb.is_some_and(|have| have >= v))
            && self
                .max_price_per_hour
                .is_none_or(|p| offer.price_per_hour <= p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_filters() {
        let mut o = Offer::new(ProviderKind::Vast, "1", Usd::from_dollars(0.4));
        o.gpu = Some("GeForce RTX 4090".into());
        o.count = 2;
        o.vram_gb = Some(24.0);
        let q = |f: fn(&mut OfferQuery)| {
            let mut q = OfferQuery::default();
            f(&mut q);
            q.matches(&o)
        };
        assert!(q(|_| {}));
        assert!(q(|q| q.gpus = vec!["RTX_4090".into()]));
        assert!(q(|q| q.gpus = vec!["rtx 4090".into(), "H100".into()]));
        assert!(!q(|q| q.gpus = vec!["H100".into()]));
        assert!(q(|q| q.min_count = Some(2)));
        assert!(!q(|q| q.min_count = Some(4)));
        assert!(!q(|q| q.min_vram_gb = Some(40.0)));
        assert!(!q(|q| q.max_price_per_hour = Some(Usd::from_cents(39))));
    }
}
