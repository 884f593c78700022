//! Manifest loading end to end: the examples, the checked-in schemas, every malformed
//! fixture with its exact problem list, matrices, folders and stored copies; and hostile
//! input (alias bombs, devices, FIFOs, huge files and durations, empty input) through the
//! real binary, where a user meets it.

mod support;

use asimov::manifest::{
    BudgetAction, Context, Kind, Loaded, MetricMode, Placement, Problems, RetryOn, Source,
    load_paths, load_str, schema_json,
};
use asimov::model::ProviderKind;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::cli::Asimov;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ctx() -> Context {
    Context {
        secrets: BTreeSet::from(["HF_TOKEN".to_string()]),
        ..Context::default()
    }
}

/// What the examples need stored: the HF token, S3's keys and Lambda's terminate key.
fn examples_ctx() -> Context {
    Context {
        secrets: BTreeSet::from(
            [
                "HF_TOKEN",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "LAMBDA_TERMINATE_KEY",
            ]
            .map(String::from),
        ),
        ..Context::default()
    }
}

fn load(text: &str) -> Result<Loaded, Problems> {
    load_str(Path::new("/manifests/job.yaml"), text, &ctx())
}

fn problems(text: &str) -> String {
    match load(text) {
        Ok(_) => panic!("expected problems, the manifest loaded"),
        Err(p) => p.to_string(),
    }
}

#[test]
fn schemas_are_checked_in_and_current() {
    let update = std::env::var_os("ASIMOV_UPDATE_SCHEMAS").is_some_and(|v| v == "1");
    let dir = crate_dir().join("schemas");
    let mut drift = Vec::new();
    for kind in Kind::ALL {
        let path = dir.join(kind.schema_file());
        let fresh = schema_json(kind);
        let parsed: serde_json::Value = serde_json::from_str(&fresh).expect("schema is json");
        assert_eq!(parsed["title"], format!("asimov {kind}"));
        if update {
            std::fs::create_dir_all(&dir).expect("create schemas/");
            std::fs::write(&path, &fresh).expect("write schema");
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(fresh.as_str()) {
            drift.push(path.display().to_string());
        }
    }
    assert!(
        drift.is_empty(),
        "schemas differ from the types: {drift:?}; rerun with ASIMOV_UPDATE_SCHEMAS=1"
    );
}

/// Every example loads, together and one file at a time, and its stored copy loads back
/// to the same objects.
#[test]
fn every_example_loads_and_round_trips() {
    let examples = crate_dir().join("examples");
    let all = load_paths(std::slice::from_ref(&examples), &examples_ctx())
        .unwrap_or_else(|p| panic!("{p}"));
    let m = &all.manifests;
    let mut jobs: Vec<&str> = m.jobs.iter().map(|j| j.name.as_str()).collect();
    jobs.sort();
    assert_eq!(
        jobs,
        [
            "from-file",
            "hello",
            "hf-finetune",
            "imagenet",
            "lab-train",
            "nightly",
            "pod-finetune",
            "resumable",
            "s3-train",
            "swag-sweep",
            "swag-train",
            "sweep"
        ]
    );
    assert_eq!(m.fleets.len(), 1);
    assert_eq!(m.budgets.len(), 1);
    assert_eq!(all.documents.len(), 14);

    // Each file alone, in a home that already has the folder's fleets and budgets.
    let home = Context {
        fleets: m.fleets.iter().map(|f| f.name.clone()).collect(),
        budgets: m.budgets.iter().map(|b| b.name.clone()).collect(),
        ..examples_ctx()
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&examples)
        .expect("examples/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 13);
    for file in &files {
        let one = load_paths(std::slice::from_ref(file), &home)
            .unwrap_or_else(|p| panic!("{}: {p}", file.display()));
        assert!(!one.documents.is_empty(), "{}", file.display());
    }

    // Stored copies, written elsewhere, mean the same thing.
    let store = tempfile::tempdir().expect("tempdir");
    for doc in &all.documents {
        let path = store.path().join(format!("{}-{}.yaml", doc.kind, doc.name));
        let again = load_str(&path, &doc.yaml, &home).unwrap_or_else(|p| panic!("{p}"));
        let m2 = &again.manifests;
        match doc.kind {
            Kind::Job => {
                let a = m.jobs.iter().find(|j| j.name == doc.name).expect("job");
                let b = &m2.jobs[0];
                assert_eq!(a.spec, b.spec, "{}", doc.name);
                assert_eq!(a.runs, b.runs, "{}", doc.name);
                assert_eq!(a.spec_hash, b.spec_hash, "{}", doc.name);
            }
            Kind::Fleet => assert_eq!(m.fleets[0].hosts, m2.fleets[0].hosts),
            Kind::Budget => assert_eq!(m.budgets[0].limit_usd, m2.budgets[0].limit_usd),
        }
    }
}

#[test]
fn hello_example_is_a_local_job_with_progress() {
    let file = crate_dir().join("examples/hello.yaml");
    let loaded = load_paths(std::slice::from_ref(&file), &Context::default())
        .unwrap_or_else(|p| panic!("{p}"));
    let job = &loaded.manifests.jobs[0];
    assert_eq!(job.name, "hello");
    assert_eq!(job.spec.placement, vec![Placement::local()]);
    assert_eq!(job.spec.resources.gpu, None);
    assert_eq!(job.runs.len(), 1);
    assert_eq!(job.runs[0].name, "hello-0");
    assert!(job.runs[0].command.contains("ASIMOV_PROGRESS $i/10"));
    assert_eq!(job.origin.file, file);
    assert_eq!(job.origin.line, 3);
}

#[test]
fn swag_train_has_every_field() {
    let dir = crate_dir().join("examples");
    let loaded = load_paths(
        &[dir.join("budget.yaml"), dir.join("swag-train.yaml")],
        &examples_ctx(),
    )
    .unwrap_or_else(|p| panic!("{p}"));
    let job = &loaded.manifests.jobs[0];
    let s = &job.spec;
    assert_eq!(s.source, Source::Workdir(dir.clone()));
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME"));
    assert_eq!(s.files[0].from, home.join(".tmux.conf"));
    assert_eq!(s.files[0].to, "~/.tmux.conf");
    assert_eq!(s.secrets, ["HF_TOKEN"]);
    assert_eq!(s.env["WANDB_MODE"], "offline");
    let gpu = s.resources.gpu.as_ref().expect("gpu");
    assert_eq!(gpu.names, ["H100", "A100"]);
    assert_eq!((gpu.count, gpu.min_vram_gb), (1, Some(40)));
    assert_eq!(s.resources.cuda.as_deref(), Some("12.1"));
    assert_eq!(s.placement.len(), 2);
    assert_eq!(s.placement[0].provider, ProviderKind::Lambda);
    assert_eq!(
        s.placement[0].instance_types,
        ["gpu_1x_gh200", "gpu_1x_h100_pcie"]
    );
    assert_eq!(s.placement[1].provider, ProviderKind::Vast);
    assert_eq!(s.placement[1].max_price_per_hour, Some(2.5));
    assert_eq!(s.placement[1].premium_pct, Some(10.0));
    assert_eq!(s.placement[1].filters["reliability"], ">=0.98");
    assert_eq!(s.max_duration, Some(Duration::from_secs(43 * 3600)));
    assert_eq!(
        s.retry.on,
        [RetryOn::NoCapacity, RetryOn::Preemption, RetryOn::Error]
    );
    let cp = s.checkpoint.as_ref().expect("checkpoint");
    assert_eq!(cp.every, Some(Duration::from_secs(1800)));
    assert_eq!(
        s.artifacts.as_ref().and_then(|a| a.to.as_deref()),
        Some("s3://bucket/runs")
    );
    assert_eq!(s.stop_when[0].mode, MetricMode::Max);
    assert_eq!(s.stop_when[0].patience, Some(50));
    assert_eq!(s.schedule.as_ref().and_then(|x| x.at), Some(1_795_411_380));
    assert_eq!(s.budget.as_deref(), Some("team-a"));
    assert_eq!(loaded.manifests.budgets[0].action, BudgetAction::Block);
    assert_eq!(
        loaded.manifests.budgets[0].period,
        Some(Duration::from_secs(30 * 86400))
    );
    assert_eq!(job.runs.len(), 4);
    assert_eq!(job.spec_hash.len(), 64);
}

#[test]
fn matrix_is_a_stable_cartesian_product() {
    let text = "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: sweep}\nspec:\n  source: {git: {repo: r, ref: dev}}\n  setup: [\"git log -1 ${matrix.branch}\"]\n  run: train --config ${matrix.config} --lr ${matrix.lr}\n  matrix:\n    lr: [1e-4, 0.5]\n    config: [b.yaml, a.yaml]\n    branch: [main, exp]\n";
    let job = load(text)
        .unwrap_or_else(|p| panic!("{p}"))
        .manifests
        .jobs
        .remove(0);
    let runs: Vec<String> = job
        .runs
        .iter()
        .map(|r| format!("{} {} {:?} {}", r.name, r.command, r.git_ref, r.setup[0]))
        .collect();
    assert_eq!(
        runs,
        [
            "sweep-0 train --config b.yaml --lr 0.0001 Some(\"main\") git log -1 main",
            "sweep-1 train --config b.yaml --lr 0.5 Some(\"main\") git log -1 main",
            "sweep-2 train --config a.yaml --lr 0.0001 Some(\"main\") git log -1 main",
            "sweep-3 train --config a.yaml --lr 0.5 Some(\"main\") git log -1 main",
            "sweep-4 train --config b.yaml --lr 0.0001 Some(\"exp\") git log -1 exp",
            "sweep-5 train --config b.yaml --lr 0.5 Some(\"exp\") git log -1 exp",
            "sweep-6 train --config a.yaml --lr 0.0001 Some(\"exp\") git log -1 exp",
            "sweep-7 train --config a.yaml --lr 0.5 Some(\"exp\") git log -1 exp",
        ]
    );
    assert_eq!(job.runs[5].index, 5);
    assert_eq!(job.runs[5].matrix["lr"], "0.5");

    // Writing the keys in another order changes neither the runs nor the hash.
    let reordered = text.replace(
        "    lr: [1e-4, 0.5]\n    config: [b.yaml, a.yaml]\n    branch: [main, exp]\n",
        "    branch: [main, exp]\n    config: [b.yaml, a.yaml]\n    lr: [1e-4, 0.5]\n",
    );
    assert_ne!(reordered, text);
    let again = load(&reordered)
        .unwrap_or_else(|p| panic!("{p}"))
        .manifests
        .jobs
        .remove(0);
    assert_eq!(again.runs, job.runs);
    assert_eq!(again.spec_hash, job.spec_hash);

    // Changing a value changes the hash; labels are not part of the spec.
    let edited = load(&text.replace("0.5", "0.25"))
        .expect("valid")
        .manifests
        .jobs
        .remove(0);
    assert_ne!(edited.spec_hash, job.spec_hash);
    let labelled = load(&text.replace("{name: sweep}", "{name: sweep, labels: {a: b}}"))
        .expect("valid")
        .manifests
        .jobs
        .remove(0);
    assert_eq!(labelled.spec_hash, job.spec_hash);
}

#[test]
fn no_matrix_means_one_run_on_the_source_ref() {
    let job = load("apiVersion: asimov/v1\nkind: Job\nmetadata: {name: one}\nspec:\n  source: {git: {repo: r, ref: v1.2}}\n  run: make\n")
        .expect("valid")
        .manifests
        .jobs
        .remove(0);
    assert_eq!(job.runs.len(), 1);
    assert_eq!(job.runs[0].name, "one-0");
    assert_eq!(job.runs[0].git_ref.as_deref(), Some("v1.2"));
    assert_eq!(job.runs[0].command, "make");
    assert!(job.runs[0].matrix.is_empty());
    assert_eq!(job.spec.placement, vec![Placement::local()]);
    assert_eq!(job.spec.retry.max_restarts, 3);
}

#[test]
fn runs_file_gives_one_run_per_line() {
    let file = crate_dir().join("examples/runs.yaml");
    let loaded = load_paths(&[file], &ctx()).unwrap_or_else(|p| panic!("{p}"));
    let job = &loaded.manifests.jobs[0];
    let runs: Vec<String> = job
        .runs
        .iter()
        .map(|r| format!("{} [{}] {:?}", r.name, r.command, r.git_ref))
        .collect();
    assert_eq!(
        runs,
        [
            "from-file-0 [python train.py --config configs/base.yaml] Some(\"main\")",
            "from-file-1 [python train.py --config configs/base.yaml] Some(\"exp-warmup\")",
            // A blank branch falls back to the source's ref.
            "from-file-2 [python train.py --config configs/large.yaml] Some(\"main\")",
        ]
    );
    assert_eq!(job.runs[2].matrix["branch"], "");
    assert!(
        loaded.documents[0]
            .yaml
            .contains(&crate_dir().join("examples/runs.txt").display().to_string())
    );
}

#[test]
fn runs_file_content_is_part_of_the_spec_hash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dir.path().join("job.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: f}\nspec:\n  run: t ${matrix.config}\n  matrix: {file: runs.txt}\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("runs.txt"), "a.yaml,main\n").expect("write");
    let first = load_paths(std::slice::from_ref(&manifest), &ctx()).expect("valid");
    std::fs::write(dir.path().join("runs.txt"), "a.yaml,main\nb.yaml,main\n").expect("write");
    let second = load_paths(&[manifest], &ctx()).expect("valid");
    let (a, b) = (&first.manifests.jobs[0], &second.manifests.jobs[0]);
    assert_eq!((a.runs.len(), b.runs.len()), (1, 2));
    assert_ne!(a.spec_hash, b.spec_hash);
}

#[test]
fn several_documents_in_one_file() {
    let file = crate_dir().join("examples/fleet.yaml");
    let loaded = load_paths(std::slice::from_ref(&file), &Context::default())
        .unwrap_or_else(|p| panic!("{p}"));
    let kinds: Vec<(Kind, &str, usize)> = loaded
        .documents
        .iter()
        .map(|d| (d.kind, d.name.as_str(), d.origin.line))
        .collect();
    assert_eq!(
        kinds,
        [(Kind::Fleet, "lab", 2), (Kind::Job, "lab-train", 21)]
    );
    let fleet = &loaded.manifests.fleets[0];
    let hosts: Vec<(&str, &str, u16, u32)> = fleet
        .hosts
        .iter()
        .map(|h| (h.name.as_str(), h.address.as_str(), h.port, h.gpus))
        .collect();
    assert_eq!(
        hosts,
        [
            ("gpu-box-1", "10.0.0.11", 22, 2),
            ("gpu-box-2", "10.0.0.12", 2222, 1)
        ]
    );
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME"));
    assert_eq!(
        fleet.hosts[0].identity_file.as_deref(),
        Some(home.join(".ssh/id_ed25519").as_path())
    );
    // Each stored document holds one object only.
    for d in &loaded.documents {
        assert!(!d.yaml.contains("---\n"), "{}", d.yaml);
        assert!(d.yaml.contains(&format!("name: {}", d.name)), "{}", d.yaml);
    }
}

#[test]
fn folders_load_yaml_files_in_name_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: NAME}\nspec:\n  run: x\n  placement: [{provider: ssh, fleet: pool}]\n";
    std::fs::write(dir.path().join("b.yaml"), job.replace("NAME", "bee")).expect("write");
    std::fs::write(dir.path().join("a.yml"), job.replace("NAME", "ay")).expect("write");
    std::fs::write(
        dir.path().join("c.yaml"),
        "apiVersion: asimov/v1\nkind: Fleet\nmetadata: {name: pool}\nspec:\n  hosts: [{address: h1}]\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("notes.txt"), "not yaml: [").expect("write");
    std::fs::write(dir.path().join(".b.yaml.swp.yaml"), "not yaml: [").expect("write");
    std::fs::create_dir(dir.path().join("nested")).expect("mkdir");
    std::fs::write(dir.path().join("nested/z.yaml"), "broken: [").expect("write");

    let loaded = load_paths(&[dir.path().to_path_buf()], &Context::default())
        .unwrap_or_else(|p| panic!("{p}"));
    let names: Vec<&str> = loaded.documents.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["ay", "bee", "pool"]);
    assert_eq!(loaded.manifests.fleets[0].hosts[0].name, "h1");

    // Without the fleet's file, both jobs are wrong, and both are reported.
    std::fs::remove_file(dir.path().join("c.yaml")).expect("rm");
    let err =
        load_paths(&[dir.path().to_path_buf()], &Context::default()).expect_err("unknown fleet");
    let a = dir.path().join("a.yml").display().to_string();
    let b = dir.path().join("b.yaml").display().to_string();
    assert_eq!(
        err.to_string(),
        format!(
            "{a}:6:38: unknown fleet `pool`: expected the name of a Fleet, and none is defined\n\
             {b}:6:38: unknown fleet `pool`: expected the name of a Fleet, and none is defined"
        )
    );

    // A fleet known in the home is enough.
    let home = Context {
        fleets: BTreeSet::from(["pool".to_string()]),
        ..Context::default()
    };
    assert!(load_paths(&[dir.path().to_path_buf()], &home).is_ok());
}

#[test]
fn unreadable_paths_are_problems() {
    let err = load_paths(&[PathBuf::from("/nonexistent/asimov/job.yaml")], &ctx())
        .expect_err("missing file");
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].line, 0);
    assert!(
        err.to_string()
            .starts_with("/nonexistent/asimov/job.yaml: cannot read manifest: "),
        "{err}"
    );
}

#[test]
fn problems_carry_exact_positions() {
    let text = "apiVersion: asimov/v1\nkind: Job\nmetadata:\n  name: x\nspec:\n  run: echo\n  max_duration: forever\n  placement:\n    - {provider: vast, colour: red}\n";
    let err = load(text).expect_err("two problems");
    let got: Vec<(usize, usize, &str)> = err
        .0
        .iter()
        .map(|p| (p.line, p.column, p.path.as_str()))
        .collect();
    // Stage 1 finds the unknown field; stage 2 still checks the rest of the document.
    assert_eq!(
        got,
        [
            (7, 17, "/spec/max_duration"),
            (9, 24, "/spec/placement/0/colour")
        ]
    );
    assert_eq!(
        err.to_string(),
        "/manifests/job.yaml:7:17: expected a duration like 30m or 43h, found \"forever\"\n\
         /manifests/job.yaml:9:24: unknown field `colour`, expected one of `filters`, `fleet`, `identity_file`, `instance_types`, `keep_disk_on_pause`, `max_price_per_hour`, `premium_pct`, `provider`, `regions`, `spot`, `ssh_key`, `ssh_user`, `terminate_key`"
    );

    let text = text.replace(", colour: red", "");
    assert_eq!(
        problems(&text),
        "/manifests/job.yaml:7:17: expected a duration like 30m or 43h, found \"forever\""
    );
}

#[test]
fn dns_names_and_run_name_length() {
    let job = |name: &str, runs: usize| {
        let seeds: Vec<String> = (0..runs).map(|i| i.to_string()).collect();
        format!(
            "apiVersion: asimov/v1\nkind: Job\nmetadata: {{name: {name}}}\nspec:\n  run: echo ${{matrix.seed}}\n  matrix: {{seed: [{}]}}\n",
            seeds.join(", ")
        )
    };
    let sixty_one = "a".repeat(61);
    // 61 + "-9" = 63 fits; 61 + "-10" = 64 does not.
    assert!(load(&job(&sixty_one, 10)).is_ok());
    assert_eq!(
        problems(&job(&sixty_one, 11)),
        format!(
            "/manifests/job.yaml:3:18: expected a job name short enough for its run names, found \"{sixty_one}\": run `{sixty_one}-10` has 64 characters, at most 63 are allowed"
        )
    );
    assert!(problems(&job("UPPER", 1)).contains("expected a job name that is a DNS label"));
    assert!(problems(&job("-dash", 1)).contains("DNS label"));
    assert!(problems(&job(&"b".repeat(64), 1)).contains("DNS label"));
}

#[test]
fn problems_display_all_at_once() {
    let text = "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: Bad_Name}\nspec:\n  run: echo ${matrix.nope}\n  max_duration: 1 eon\n  secrets: [MISSING]\n  budget: nobody\n";
    assert_eq!(
        problems(text),
        "/manifests/job.yaml:3:18: expected a job name that is a DNS label (lowercase letters, digits and `-`, starting and ending with a letter or digit, at most 63 characters), found \"Bad_Name\"\n\
         /manifests/job.yaml:5:8: `${matrix.nope}` names no matrix key: the job has no matrix\n\
         /manifests/job.yaml:6:17: expected a duration like 30m or 43h, found \"1 eon\"\n\
         /manifests/job.yaml:7:13: unknown secret `MISSING`: expected the name of a stored secret (stored: `HF_TOKEN`); store it with `asimov secret set MISSING`\n\
         /manifests/job.yaml:8:11: unknown budget `nobody`: expected the name of a Budget, and none is defined"
    );
}

/// Every malformed fixture fails with exactly the problems in its snapshot.
#[test]
fn malformed_manifests_report_every_problem() {
    let dir = crate_dir().join("tests/fixtures/manifests/bad");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 25, "only {} malformed fixtures", files.len());
    let prefix = format!("{}/", crate_dir().display());
    for file in files {
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("name")
            .to_string();
        let err = match load_paths(std::slice::from_ref(&file), &ctx()) {
            Ok(_) => panic!("{stem}: loaded without problems"),
            Err(e) => e,
        };
        for p in &err.0 {
            assert!(p.line > 0 && p.column > 0, "{stem}: no position in {p}");
        }
        let text = err.to_string().replace(&prefix, "");
        insta::with_settings!({
            snapshot_path => "fixtures/manifests/snapshots",
            prepend_module_to_snapshot => false,
            omit_expression => true,
            description => format!("problems in bad/{stem}.yaml"),
        }, {
            insta::assert_snapshot!(stem, text);
        });
    }
}

/// Oversized files and anything that is not a regular file are refused without reading
/// them (a FIFO would block, a device never ends).
#[test]
fn special_and_oversized_files_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big.yaml");
    // Valid YAML (a comment) just over the bound: refused for its size alone.
    let mut text = String::from("#");
    text.push_str(&" ".repeat(1 << 20)); // MAX_FILE_BYTES
    std::fs::write(&big, text).expect("write");
    let fifo = dir.path().join("fifo.yaml");
    mkfifo(&fifo);
    let paths = [
        big.clone(),
        fifo.clone(),
        PathBuf::from("/dev/zero"),
        PathBuf::from("/dev/null"),
    ];
    let err = load_paths(&paths, &ctx()).expect_err("nothing here is a manifest");
    let text = err
        .to_string()
        .replace(&format!("{}/", dir.path().display()), "");
    assert_eq!(
        text,
        "big.yaml: cannot read manifest: the file has 1048577 bytes, more than the 1 MiB a manifest may have\n\
         fifo.yaml: cannot read manifest: expected a regular file, found a FIFO\n\
         /dev/zero: cannot read manifest: expected a regular file, found a character device\n\
         /dev/null: cannot read manifest: expected a regular file, found a character device"
    );

    // In a folder, a FIFO named like a manifest is reported, not skipped or waited on.
    let folder = dir.path().join("manifests");
    std::fs::create_dir(&folder).expect("mkdir");
    mkfifo(&folder.join("job.yaml"));
    let err = load_paths(&[folder], &ctx()).expect_err("a FIFO");
    assert!(
        err.to_string()
            .ends_with("job.yaml: cannot read manifest: expected a regular file, found a FIFO"),
        "{err}"
    );
}

/// A byte-order mark is not part of the text: the manifest loads, positions unchanged.
#[test]
fn a_byte_order_mark_is_ignored() {
    let text =
        "\u{feff}apiVersion: asimov/v1\nkind: Job\nmetadata: {name: bom}\nspec:\n  run: echo\n";
    let loaded = load(text).unwrap_or_else(|p| panic!("{p}"));
    assert_eq!(loaded.manifests.jobs[0].name, "bom");
    assert_eq!(loaded.documents[0].origin.line, 1);
    let plain = load(text.trim_start_matches('\u{feff}')).expect("valid");
    assert_eq!(
        plain.manifests.jobs[0].spec_hash,
        loaded.manifests.jobs[0].spec_hash
    );
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs")
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

/// Runs a command with its address space capped and a deadline, so that a regression
/// (input expanded without bound, a read that blocks) fails this test quickly instead
/// of exhausting the machine or hanging the suite.
fn run_bounded(mut cmd: Command, address_space: u64, deadline: Duration) -> Output {
    use std::os::unix::process::CommandExt;
    let limit = libc::rlimit {
        rlim_cur: address_space,
        rlim_max: address_space,
    };
    // SAFETY: setrlimit is async-signal-safe and touches only the child being spawned.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_AS, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("asimov starts");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > deadline {
            support::cli::kill9(&mut child);
            panic!("asimov did not return within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

const CAP: u64 = 1 << 30;
const DEADLINE: Duration = Duration::from_secs(30);

fn apply(a: &Asimov, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = a.command();
    cmd.arg("apply").args(args);
    let out = run_bounded(cmd, CAP, DEADLINE);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Nothing was written to the home and no controller was started.
fn assert_untouched(a: &Asimov) {
    let stored = std::fs::read_dir(a.home().join("manifests"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(stored, 0, "manifests were stored");
    assert!(!a.controller_running(), "a controller was started");
    assert!(
        !a.home().join("controller.pid").exists(),
        "a controller was started"
    );
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(crate_dir().join("tests/fixtures/manifests/bad").join(name))
        .expect("fixture")
}

#[test]
fn cli_refuses_an_alias_bomb_with_its_position() {
    let a = Asimov::new();
    let bomb = a.manifest("bomb.yaml", &fixture("alias_bomb.yaml"));
    let bomb = bomb.to_str().expect("utf-8 path");
    for args in [vec!["--dry-run", "-f", bomb], vec!["-f", bomb]] {
        let (code, stderr) = apply(&a, &args);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.starts_with(&format!(
                "{bomb}:13:32: anchors and aliases expand this document beyond 2 MiB"
            )),
            "{stderr}"
        );
        assert_untouched(&a);
    }

    // The same file in a watched folder: the controller reports it and lives on.
    let folder = a.repo.path().join("watched");
    std::fs::create_dir(&folder).expect("mkdir");
    std::fs::write(folder.join("bomb.yaml"), fixture("alias_bomb.yaml")).expect("write");
    let mut cmd = a.command();
    cmd.args(["controller", "--once", "--manifests"])
        .arg(&folder);
    let out = run_bounded(cmd, CAP, DEADLINE);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code().is_some(), "killed by a signal: {stderr}");
    assert!(
        stderr.contains("bomb.yaml:13:32: anchors and aliases expand"),
        "{stderr}"
    );
}

#[test]
fn cli_refuses_devices_fifos_and_huge_files_at_once() {
    let a = Asimov::new();
    let fifo = a.repo.path().join("fifo.yaml");
    mkfifo(&fifo);
    let big = a.repo.path().join("big.yaml");
    std::fs::write(&big, vec![b'#'; 64 << 20]).expect("write");
    for (path, reason) in [
        (
            PathBuf::from("/dev/zero"),
            "expected a regular file, found a character device",
        ),
        (fifo, "expected a regular file, found a FIFO"),
        (
            big,
            "the file has 67108864 bytes, more than the 1 MiB a manifest may have",
        ),
    ] {
        let path = path.to_str().expect("utf-8 path");
        let (code, stderr) = apply(&a, &["-f", path]);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.starts_with(&format!("{path}: cannot read manifest: {reason}\n")),
            "{stderr}"
        );
        assert_untouched(&a);
    }
}

#[test]
fn cli_refuses_a_max_duration_beyond_the_maximum() {
    let a = Asimov::new();
    let job = a.manifest(
        "job.yaml",
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: forever}\nspec:\n  run: echo\n  max_duration: 3000000000000000h\n",
    );
    let job = job.to_str().expect("utf-8 path");
    let (code, stderr) = apply(&a, &["-f", job]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "{job}:6:17: expected a duration of at most 10years, found \"3000000000000000h\"\n\
             error: 1 problem(s) in the manifests; nothing was changed\n"
        )
    );
    assert_untouched(&a);
}

#[test]
fn cli_accepts_a_byte_order_mark() {
    let a = Asimov::new();
    let job = a.manifest(
        "job.yaml",
        "\u{feff}apiVersion: asimov/v1\nkind: Job\nmetadata: {name: bom}\nspec:\n  run: echo\n",
    );
    let out = a.ok(&[
        "apply",
        "--dry-run",
        "-f",
        job.to_str().expect("utf-8 path"),
    ]);
    assert!(
        out.starts_with(
            "job/bom created (dry run)\n  run/bom-0 would start on local (this machine, "
        ),
        "{out}"
    );
}

#[test]
fn cli_reports_only_the_size_of_a_too_large_matrix() {
    let a = Asimov::new();
    let job = a.manifest("job.yaml", &fixture("matrix_too_large.yaml"));
    let job = job.to_str().expect("utf-8 path");
    let (code, stderr) = apply(&a, &["--dry-run", "-f", job]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "{job}:7:3: expected at most 10000 runs, the matrix makes 10100\n\
             error: 1 problem(s) in the manifests; nothing was changed\n"
        )
    );
}

/// An empty file or folder applies nothing: an error naming it, and no controller.
#[test]
fn cli_says_when_there_is_nothing_to_apply() {
    let a = Asimov::new();
    let empty = a.manifest("empty.yaml", "");
    let comments = a.manifest("comments.yaml", "# a job will go here\n---\n");
    let folder = a.repo.path().join("manifests");
    std::fs::create_dir(&folder).expect("mkdir");
    std::fs::write(folder.join("README.txt"), "not a manifest").expect("write");
    for path in [&empty, &comments, &folder] {
        let path = path.to_str().expect("utf-8 path");
        for dry in [false, true] {
            let mut args = vec!["-f", path];
            if dry {
                args.push("--dry-run");
            }
            let (code, stderr) = apply(&a, &args);
            assert_eq!(code, Some(1), "{stderr}");
            assert_eq!(
                stderr,
                format!(
                    "error: nothing to apply: no manifest in {path} (folders are read for \
                     *.yaml and *.yml files directly inside); nothing was changed\n"
                )
            );
            assert_untouched(&a);
        }
    }
    // `/dev/null` is not a file of manifests either, and says so.
    let (code, stderr) = apply(&a, &["-f", "/dev/null"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with("/dev/null: cannot read manifest: expected a regular file"),
        "{stderr}"
    );
    assert_untouched(&a);
}

#[test]
fn s3_artifacts_need_the_stored_keys_and_an_http_endpoint() {
    let text = "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: s}\nspec:\n  run: x\n  \
                artifacts: {paths: [out], to: s3://b/p, endpoint: ftp://x}\n";
    let none = Context::default();
    let problems = load_str(Path::new("/manifests/job.yaml"), text, &none)
        .map(|_| ())
        .expect_err("refused")
        .to_string();
    assert!(
        problems.contains("AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"),
        "{problems}"
    );
    assert!(
        problems.contains("expected an http(s):// URL"),
        "{problems}"
    );
    assert!(problems.contains("job.yaml:6:"), "{problems}");
    let fixed = text.replace("ftp://x", "http://127.0.0.1:9000");
    load_str(Path::new("/manifests/job.yaml"), &fixed, &examples_ctx())
        .unwrap_or_else(|p| panic!("{p}"));
}
