//! Races between the controller's look at the world and the world changing under it,
//! through the real binary and a background controller, as a user meets them. Each
//! window is widened by a delay point (`ASIMOV_DELAYPOINT`), so the race is met on
//! every run rather than once in a hundred.

mod support;

use std::path::Path;
use std::time::Duration;
use support::cli::Asimov;

/// How often the controller log says the delay point `name` was reached.
fn reached(a: &Asimov, name: &str) -> usize {
    let log = std::fs::read_to_string(a.home().join("controller.log")).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("delay point reached") && l.contains(name))
        .count()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

// Defect: a local instance folder removed between the listing (which saw it) and the
// status read (which found nothing) looked "not started", and the planner started the
// job again within the same attempt. The folder is the instance: its absence is now a
// failed read, and the next listing decides.
#[test]
fn an_instance_folder_gone_between_listing_and_status_read_is_not_started_again() {
    let a = Asimov::new();
    let starts = a.home().join("starts");
    let manifest = format!(
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {{name: vanish}}\nspec:\n  run: {:?}\n  \
         retry: {{on: [preemption], max_restarts: 3}}\n",
        format!(
            "echo \"$ASIMOV_INSTANCE\" >> {}; exec sleep 600",
            starts.display()
        )
    );
    let file = a.manifest("vanish.yaml", &manifest);
    let point = "observe:before-status";
    let out = a
        .command()
        .args(["apply", "-f", file.to_str().unwrap()])
        // ASIMOV_* variables reach the background controller `apply` starts.
        .env("ASIMOV_DELAYPOINT", format!("{point}:3000"))
        .env("ASIMOV_LOG", "info")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.wait_for("vanish-0 to run", Duration::from_secs(60), || {
        a.run_phase("vanish-0").as_deref() == Some("Running") && lines(&starts).len() == 1
    });
    // Into the window: the pass has listed the instance and waits before reading it.
    let seen = reached(&a, point);
    a.wait_for("the next status read", Duration::from_secs(90), || {
        reached(&a, point) > seen
    });
    let instances = a.local_instances();
    assert_eq!(instances.len(), 1, "{instances:?}");
    std::fs::remove_dir_all(a.home().join("local").join(&instances[0])).unwrap();
    // The attempt ends with its instance and the next one starts; a start within the
    // same attempt would write the same tag twice.
    a.wait_for("a second start", Duration::from_secs(120), || {
        lines(&starts).len() >= 2
    });
    let all = lines(&starts);
    let distinct: std::collections::BTreeSet<&String> = all.iter().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "the job ran twice in one attempt: {all:?}"
    );
}
