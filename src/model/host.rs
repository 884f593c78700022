//! A machine of a fixed pool (an ssh fleet host) and what it can take: the one host
//! type the provider lists, the planner queues on and the store keeps.

/// One host of a fleet as its provider last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostStatus {
    pub fleet: String,
    pub host: String,
    /// False when the last attempt to reach it failed, or it was never contacted: nothing
    /// is placed on it, and its instances are neither destroyed nor taken as live.
    pub reachable: bool,
    /// No job of any size fits on it now, answering or not ([`HostStatus::is_full`]).
    pub busy: bool,
    /// GPUs the manifest declares.
    pub gpus_total: u32,
    /// GPUs no instance holds; 0 while an instance holds the whole host.
    pub gpus_free: u32,
    /// From `nvidia-smi` when present (`NVIDIA A100-SXM4-80GB, 81920 MiB`).
    pub gpu_names: Vec<String>,
    /// Rendered tags of every instance (slot) on the host.
    pub running: Vec<String>,
    /// Tags of the instances whose agent process is alive.
    pub agents_alive: Vec<String>,
    /// Why it is unreachable, or "not contacted yet"; `None` when fine.
    pub message: Option<String>,
}

impl HostStatus {
    /// GPUs left on a host of `total` GPUs holding instances of `held` GPUs each; an
    /// instance holding 0 GPUs holds the whole host.
    pub fn free_gpus(total: u32, held: impl IntoIterator<Item = u32>) -> u32 {
        let mut used = 0u32;
        for g in held {
            if g == 0 {
                return 0;
            }
            used = used.saturating_add(g);
        }
        total.saturating_sub(used)
    }

    pub fn slots(&self) -> u32 {
        u32::try_from(self.running.len()).unwrap_or(u32::MAX)
    }

    /// The fit rule, the one place it is written: GPU jobs side by side while their
    /// counts fit; a job asking for no GPU takes a whole idle host.
    pub fn fits(&self, gpus: u32) -> bool {
        self.reachable
            && gpus <= self.gpus_total
            && if gpus == 0 {
                self.running.is_empty()
            } else {
                self.gpus_free >= gpus
            }
    }

    /// No job of any size fits on it now (whether or not it answers): what `busy` holds.
    pub fn is_full(&self) -> bool {
        if self.gpus_total == 0 {
            !self.running.is_empty()
        } else {
            self.gpus_free == 0
        }
    }

    /// True when some job of `gpus` could ever run here.
    pub fn could_take(&self, gpus: u32) -> bool {
        gpus <= self.gpus_total
    }

    /// Takes room for the instance `tag` of `gpus` (after [`HostStatus::fits`] said yes).
    pub fn take(&mut self, gpus: u32, tag: &str) {
        self.running.push(tag.to_string());
        self.gpus_free = if gpus == 0 {
            0
        } else {
            self.gpus_free.saturating_sub(gpus)
        };
        self.busy = self.is_full();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(total: u32, held: &[u32]) -> HostStatus {
        HostStatus {
            reachable: true,
            gpus_total: total,
            gpus_free: HostStatus::free_gpus(total, held.iter().copied()),
            running: held.iter().map(|g| format!("t{g}")).collect(),
            ..HostStatus::default()
        }
    }

    #[test]
    fn fit_rule() {
        assert_eq!(HostStatus::free_gpus(4, [1, 2]), 1);
        assert_eq!(HostStatus::free_gpus(4, [0]), 0);
        assert!(host(4, &[1, 2]).fits(1));
        assert!(!host(4, &[1, 2]).fits(2));
        assert!(!host(4, &[1]).fits(0), "a CPU job needs an idle host");
        assert!(host(0, &[]).fits(0));
        assert!(!host(0, &[0]).fits(0));
        assert!(host(0, &[0]).is_full());
        let mut h = host(2, &[]);
        h.take(2, "x");
        assert!(h.busy && h.is_full() && !h.fits(1));
        let mut down = host(8, &[]);
        down.reachable = false;
        assert!(!down.fits(1) && !down.is_full());
    }
}
