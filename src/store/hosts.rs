//! The `hosts` table: the last known status of each fleet host.

use super::{HostRecord, Store, StoreResult, json_column, query, to_json};
use crate::model::HostStatus;
use rusqlite::{Row, named_params};

const COLUMNS: &str =
    "fleet, host, reachable, busy, gpus_total, gpus_free, gpu_names, running, checked_at, message";

fn from_row(row: &Row<'_>) -> rusqlite::Result<HostRecord> {
    let message: String = row.get(9)?;
    Ok(HostRecord {
        status: HostStatus {
            fleet: row.get(0)?,
            host: row.get(1)?,
            reachable: row.get(2)?,
            busy: row.get(3)?,
            gpus_total: row.get(4)?,
            gpus_free: row.get(5)?,
            gpu_names: json_column(row, 6)?,
            running: json_column(row, 7)?,
            agents_alive: Vec::new(),
            message: (!message.is_empty()).then_some(message),
        },
        checked_at: row.get(8)?,
    })
}

impl Store {
    /// Inserts or replaces the status of host `(fleet, host)`.
    pub fn put_host(&self, host: &HostRecord) -> StoreResult<()> {
        const STEP: &str = "writing a host";
        let gpu_names = to_json(&host.gpu_names).map_err(query(STEP))?;
        let running = to_json(&host.running).map_err(query(STEP))?;
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO hosts (fleet, host, reachable, busy, gpus_total, \
                 gpus_free, gpu_names, running, checked_at, message) \
                 VALUES (:fleet, :host, :reachable, :busy, :gpus_total, :gpus_free, \
                 :gpu_names, :running, :checked_at, :message)",
            )
            .and_then(|mut stmt| {
                stmt.execute(named_params! {
                    ":fleet": host.fleet,
                    ":host": host.host,
                    ":reachable": host.reachable,
                    ":busy": host.busy,
                    ":gpus_total": host.gpus_total,
                    ":gpus_free": host.gpus_free,
                    ":gpu_names": gpu_names,
                    ":running": running,
                    ":checked_at": host.checked_at,
                    ":message": host.message.as_deref().unwrap_or_default(),
                })
            })
            .map_err(query(STEP))?;
        Ok(())
    }

    /// Host statuses of one fleet, or of every fleet when `None`; by fleet, then host.
    pub fn hosts(&self, fleet: Option<&str>) -> StoreResult<Vec<HostRecord>> {
        const STEP: &str = "reading hosts";
        let sql = format!(
            "SELECT {COLUMNS} FROM hosts WHERE ?1 IS NULL OR fleet = ?1 ORDER BY fleet, host"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(query(STEP))?;
        let rows = stmt.query_map([fleet], from_row).map_err(query(STEP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query(STEP))
    }

    /// Drops the statuses of `fleet`'s hosts whose names are not in `names` (hosts removed
    /// from the manifest); returns how many were dropped.
    pub fn forget_hosts_not_in<S: AsRef<str>>(
        &self,
        fleet: &str,
        names: &[S],
    ) -> StoreResult<usize> {
        const STEP: &str = "forgetting hosts";
        let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
        let names = to_json(&names).map_err(query(STEP))?;
        self.conn
            .prepare_cached(
                "DELETE FROM hosts WHERE fleet = ?1 \
                 AND host NOT IN (SELECT value FROM json_each(?2))",
            )
            .and_then(|mut stmt| stmt.execute((fleet, names)))
            .map_err(query(STEP))
    }
}
