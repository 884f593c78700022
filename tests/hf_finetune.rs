//! The hf-finetune template's training script (`examples/hf-finetune/train.py`) run end to
//! end on CPU, in the venv `scripts/install-hf-venv.sh` installs (torch, transformers,
//! datasets, peft): a tiny randomly initialised GPT-2 and tokenizer made here, a tiny
//! local dataset with two subsets, nothing downloaded (the only hub is a local stand-in,
//! `HF_ENDPOINT`, which records every request). The first attempt writes a tqdm bar
//! asimov's parser reads, metrics as JSON lines in `ASIMOV_METRICS` and checkpoints; a
//! second attempt on a fresh folder resumes from the restored checkpoint
//! (`ASIMOV_RESUME_FROM`), finishes, and pushes the merged model: one commit that
//! really carries the config, weights, tokenizer and model card.
//!
//! Without the venv the test fails and says how to install it, unless
//! `ASIMOV_SKIP_HF_VENV=1` says to skip it.

mod support;

use asimov::agent::parse_progress;
use asimov::model::Progress;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::hub_server::HubServer;

const TOKEN: &str = "hf_TinyTokenForTheHubStandIn0123456789";
const REPO: &str = "ada/tiny-gpt2-ft";

fn venv_python() -> Option<PathBuf> {
    let venv = std::env::var_os("ASIMOV_HF_VENV")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(cache.join("asimov").join("hf-venv"))
        })?;
    let python = venv.join("bin").join("python");
    if venv.join(".asimov-stamp").is_file() && python.exists() {
        return Some(python);
    }
    if std::env::var_os("ASIMOV_SKIP_HF_VENV").is_some_and(|v| v == "1") {
        eprintln!(
            "skipped: no hf venv at {} (ASIMOV_SKIP_HF_VENV=1)",
            venv.display()
        );
        return None;
    }
    panic!(
        "no hf venv at {}: run ./scripts/install-hf-venv.sh (or set ASIMOV_SKIP_HF_VENV=1)",
        venv.display()
    );
}

/// A tiny GPT-2 (2 layers, 64 wide, random weights) with a word-level tokenizer trained
/// on the dataset's words, and a dataset folder with two subsets (`short`: 3 examples,
/// `long`: 5), laid out as a hub dataset (its README's `configs:`).
const FIXTURES: &str = r#"
import json, os, sys
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

out = sys.argv[1]
short = [{"instruction": f"Count to {n}.", "output": " ".join(str(i) for i in range(1, n + 1))}
         for n in range(1, 4)]
long = [{"instruction": f"Spell word {w}.", "output": " ".join(w)}
        for w in ["cat", "dog", "bird", "fish", "horse"]]
data = os.path.join(out, "data")
os.makedirs(data)
for name, rows in (("short", short), ("long", long)):
    with open(os.path.join(data, f"{name}.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
with open(os.path.join(data, "README.md"), "w") as f:
    f.write("---\nconfigs:\n"
            "- config_name: short\n  data_files:\n  - split: train\n    path: short.jsonl\n"
            "- config_name: long\n  data_files:\n  - split: train\n    path: long.jsonl\n"
            "---\n")

words = [r["instruction"] + " " + r["output"] for r in short + long]
tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.train_from_iterator(words, trainers.WordLevelTrainer(
    special_tokens=["[UNK]", "[PAD]", "<|endoftext|>"]))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                               eos_token="<|endoftext|>", bos_token="<|endoftext|>")
model_dir = os.path.join(out, "model")
fast.save_pretrained(model_dir)
torch.manual_seed(0)
config = GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=64, n_layer=2, n_head=2,
                    bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id,
                    pad_token_id=fast.pad_token_id)
GPT2LMHeadModel(config).save_pretrained(model_dir)
print("fixtures ready")
"#;

fn train_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hf-finetune/train.py")
}

/// The script with only the environment given here (no network variables, caches in
/// the test's folder), in `workdir` as the agent runs it.
/// Runs the script to success; returns its output, stdout and stderr in one file as
/// the agent's log has them (in the order they were written).
fn train(
    python: &Path,
    tmp: &Path,
    workdir: &Path,
    hub: &HubServer,
    vars: &[(&str, String)],
) -> String {
    let mut cmd = train_command(python, tmp, workdir, hub, vars);
    let log_path = workdir.join("log");
    let log = std::fs::File::create(&log_path).unwrap();
    let status = cmd
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .expect("python runs");
    let output = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "train.py failed: {status}\n{output}");
    output
}

fn train_command(
    python: &Path,
    tmp: &Path,
    workdir: &Path,
    hub: &HubServer,
    vars: &[(&str, String)],
) -> Command {
    std::fs::create_dir_all(workdir).unwrap();
    let mut cmd = Command::new(python);
    cmd.arg("-u")
        .arg(train_script())
        .current_dir(workdir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", tmp)
        .env("HF_HOME", tmp.join("hf-home"))
        .env("HF_ENDPOINT", hub.url())
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .env("OMP_NUM_THREADS", "1");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

fn metrics_steps(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            let loss = v["loss"].as_f64().expect("loss");
            assert!(loss.is_finite() && loss > 0.0, "loss {loss} in {line}");
            v["step"].as_u64().expect("step")
        })
        .collect()
}

/// The tensors of a safetensors file: name → its bytes.
fn tensors(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let data = &bytes[8 + len..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, t)| {
            let at = t["data_offsets"].as_array().unwrap();
            let (a, b) = (
                at[0].as_u64().unwrap() as usize,
                at[1].as_u64().unwrap() as usize,
            );
            (name.clone(), data[a..b].to_vec())
        })
        .collect()
}

fn step_checkpoints(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Writes the fixtures into `dir` (`model/`, `data/`).
fn make_fixtures(python: &Path, dir: &Path) {
    let made = Command::new(python)
        .arg("-c")
        .arg(FIXTURES)
        .arg(dir)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", dir.join("hf-home"))
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "fixtures: {}",
        String::from_utf8_lossy(&made.stderr)
    );
}

#[test]
fn trains_checkpoints_resumes_and_pushes_on_cpu() {
    let Some(python) = venv_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubServer::start(TOKEN);
    make_fixtures(&python, tmp.path());
    let model = tmp.path().join("model");
    let common = |extra: &[(&'static str, String)]| {
        let mut vars = vec![
            ("HF_MODEL", model.display().to_string()),
            ("HF_DATASET", tmp.path().join("data").display().to_string()),
            ("HF_DATASET_SUBSET", "long".to_string()),
            ("BATCH_SIZE", "2".to_string()),
            ("SEQ_LEN", "32".to_string()),
            ("SAVE_EVERY", "2".to_string()),
            ("CHECKPOINT_DIR", "output/ckpt".to_string()),
        ];
        vars.extend(extra.iter().cloned());
        vars
    };

    // First attempt: 4 steps, checkpoints at 2 and 4, no push.
    let first = tmp.path().join("attempt-1");
    let output = train(
        &python,
        tmp.path(),
        &first,
        &hub,
        &common(&[
            ("MAX_STEPS", "4".into()),
            (
                "ASIMOV_METRICS",
                first.join("metrics.jsonl").display().to_string(),
            ),
        ]),
    );
    let stdout = &output;
    assert!(
        stdout.contains("dataset: 5 examples"),
        "the `long` subset: {stdout}"
    );
    assert_eq!(
        parse_progress(&output),
        Some(Progress {
            done: 4,
            total: Some(4)
        }),
        "asimov reads the tqdm bar: {output}"
    );
    assert_eq!(metrics_steps(&first.join("metrics.jsonl")), [1, 2, 3, 4]);
    let ckpt = first.join("output/ckpt");
    assert_eq!(step_checkpoints(&ckpt), ["step-2", "step-4"]);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("step-4/asimov_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 4);
    assert_eq!(state["base_model"], model.display().to_string());
    for file in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.pt",
        "tokenizer.json",
    ] {
        assert!(
            ckpt.join("step-4").join(file).is_file(),
            "{file} in the checkpoint"
        );
    }
    assert!(
        hub.commits().is_empty(),
        "nothing pushed without HF_HUB_REPO"
    );

    // Second attempt, on a fresh folder, as after a lost instance: the checkpoint
    // restored elsewhere and named by ASIMOV_RESUME_FROM; it trains on to 8, then pushes.
    let restored = tmp.path().join("restored/ckpt");
    copy_dir(&ckpt, &restored);
    let second = tmp.path().join("attempt-2");
    let output = train(
        &python,
        tmp.path(),
        &second,
        &hub,
        &common(&[
            ("MAX_STEPS", "8".into()),
            (
                "ASIMOV_METRICS",
                second.join("metrics.jsonl").display().to_string(),
            ),
            ("ASIMOV_RESUME_FROM", restored.display().to_string()),
            ("HF_HUB_REPO", REPO.into()),
            ("HF_TOKEN", TOKEN.into()),
        ]),
    );
    let stdout = &output;
    let resumed_from = format!(
        "resuming from {} at step 4",
        restored.join("step-4").display()
    );
    assert!(stdout.contains(&resumed_from), "{stdout}");
    assert_eq!(metrics_steps(&second.join("metrics.jsonl")), [5, 6, 7, 8]);
    assert_eq!(
        parse_progress(&output),
        Some(Progress {
            done: 8,
            total: Some(8)
        })
    );
    assert_eq!(
        step_checkpoints(&second.join("output/ckpt")),
        ["step-6", "step-8"]
    );
    assert!(stdout.contains(&format!("pushed to {REPO}")), "{stdout}");

    // The push: the repo created private, one commit carrying the merged model.
    let repos = hub.repos();
    assert_eq!(repos.len(), 1, "{repos:?}");
    assert_eq!(repos[0].repo, REPO);
    assert!(repos[0].private);
    let commits = hub.commits();
    assert_eq!(commits.len(), 1, "one commit: {:?}", hub.requests());
    let commit = &commits[0];
    assert_eq!(commit.repo, REPO);
    assert_eq!(commit.revision, "main");
    assert!(commit.summary.contains("8 steps"), "{}", commit.summary);
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
    ] {
        assert!(
            commit.files.contains_key(file),
            "{file} pushed: {:?}",
            commit.files.keys()
        );
    }
    let config: serde_json::Value = serde_json::from_slice(&commit.files["config.json"]).unwrap();
    assert_eq!(config["n_layer"], 2);
    assert_eq!(config["n_embd"], 64);
    let card = String::from_utf8_lossy(&commit.files["README.md"]);
    assert!(card.starts_with("---\nbase_model:"), "{card}");
    // Merged: the base model's tensors, no adapter left, and trained (not the base).
    let pushed = tensors(&commit.files["model.safetensors"]);
    let base = tensors(&std::fs::read(model.join("model.safetensors")).unwrap());
    assert!(
        pushed.keys().all(|k| !k.contains("lora")),
        "{:?}",
        pushed.keys()
    );
    let changed: Vec<&String> = base
        .iter()
        .filter(|(name, bytes)| pushed.get(*name).is_some_and(|p| p != *bytes))
        .map(|(name, _)| name)
        .collect();
    assert!(
        changed.iter().any(|n| n.contains("attn")),
        "the LoRA update is merged into the attention weights: changed {changed:?}"
    );
    assert!(
        pushed.keys().any(|k| k.contains("h.1.")),
        "both layers pushed"
    );

    // A stop (asimov's pause, delete, budget: SIGTERM to the job) saves the step it was
    // at before the job leaves, so the next attempt loses nothing.
    let third = tmp.path().join("attempt-3");
    let metrics = third.join("metrics.jsonl");
    let vars = common(&[
        ("MAX_STEPS", "1000000".into()),
        ("SAVE_EVERY", "1000000".into()),
        ("ASIMOV_METRICS", metrics.display().to_string()),
    ]);
    let mut child = train_command(&python, tmp.path(), &third, &hub, &vars)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 3) {
        assert!(
            Instant::now() < deadline,
            "no training steps within 5 minutes"
        );
        assert!(child.try_wait().unwrap().is_none(), "train.py ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = *metrics_steps(&metrics).last().unwrap();
    let saved = step_checkpoints(&third.join("output/ckpt"));
    assert_eq!(
        saved,
        [format!("step-{last}")],
        "the step it stopped at is saved"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("stopped at step {last}")),
        "{stdout}"
    );

    // Nothing was downloaded: the stand-in saw only the push.
    for request in hub.requests() {
        assert!(
            [
                "POST /api/repos/create",
                "POST /api/validate-yaml",
                &format!("POST /api/models/{REPO}/preupload/main"),
                &format!("POST /api/models/{REPO}/commit/main"),
            ]
            .contains(&request.as_str()),
            "unexpected request to the hub: {request} (all: {:?})",
            hub.requests()
        );
    }
}

/// The template as asimov runs it: the job applied on the `local` provider with the
/// template's own setup.sh (linking the shared venv) and run.sh, the token as a stored
/// secret; the run succeeds, its progress is the tqdm bar, its checkpoint is synced home,
/// and the merged model reaches the hub stand-in.
#[test]
fn the_template_runs_through_asimov_on_the_local_provider() {
    let Some(python) = venv_python() else {
        return;
    };
    let venv = python
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf();
    let a = support::cli::Asimov::new();
    let hub = HubServer::start(TOKEN);
    let fixtures = a.repo.path().join("fixtures");
    make_fixtures(&python, &fixtures);
    let job_dir = a.repo.path().join("ft");
    std::fs::create_dir_all(&job_dir).unwrap();
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hf-finetune");
    for file in ["train.py", "setup.sh", "run.sh", "requirements.txt"] {
        std::fs::copy(template.join(file), job_dir.join(file)).unwrap();
    }
    let manifest = job_dir.join("job.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: asimov/v1\nkind: Job\nmetadata: {{name: ft-tiny}}\nspec:\n  \
             source: {{workdir: .}}\n  setup: [\"sh setup.sh\"]\n  run: sh run.sh\n  env:\n    \
             HF_MODEL: {model}\n    HF_DATASET: {data}\n    HF_DATASET_SUBSET: short\n    \
             HF_HUB_REPO: {REPO}\n    HF_ENDPOINT: {hub}\n    HF_HOME: {hf_home}\n    \
             MAX_STEPS: \"6\"\n    SAVE_EVERY: \"3\"\n    BATCH_SIZE: \"2\"\n    \
             SEQ_LEN: \"32\"\n    CHECKPOINT_DIR: output/ckpt\n  secrets: [HF_TOKEN]\n  \
             placement: [{{provider: local}}]\n  checkpoint: {{path: output/ckpt, every: 30m}}\n",
            model = fixtures.join("model").display(),
            data = fixtures.join("data").display(),
            hub = hub.url(),
            hf_home = fixtures.join("hf-home").display(),
        ),
    )
    .unwrap();
    let mut set = a
        .command()
        .args(["secret", "set", "HF_TOKEN"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        set.stdin
            .take()
            .unwrap()
            .write_all(TOKEN.as_bytes())
            .unwrap();
    }
    assert!(set.wait().unwrap().success());
    let out = a
        .command()
        .env("ASIMOV_HF_VENV", &venv)
        .args(["apply", "-f", manifest.to_str().unwrap(), "--wait"])
        .output()
        .unwrap();
    let log = a.run(&["logs", "ft-tiny-0"]);
    let log = String::from_utf8_lossy(&log.stdout).into_owned();
    assert!(
        out.status.success(),
        "apply --wait: {}\n--- log\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.run_phase("ft-tiny-0").as_deref(), Some("Succeeded"));
    assert!(
        log.contains(&format!("in {}", venv.display())),
        "the shared venv: {log}"
    );
    assert!(
        log.contains("dataset: 3 examples"),
        "the `short` subset: {log}"
    );
    assert_eq!(
        parse_progress(&log),
        Some(Progress {
            done: 6,
            total: Some(6)
        })
    );
    let run = &a.runs_json()["items"][0];
    assert_eq!(run["progress"]["total"], 6, "{run}");
    // The checkpoint came home complete.
    let home_ckpts = a.home().join("checkpoints/ft-tiny-0");
    let synced: Vec<PathBuf> = std::fs::read_dir(&home_ckpts)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("step-6").join("asimov_state.json"))
        .filter(|p| p.is_file())
        .collect();
    assert!(
        !synced.is_empty(),
        "step-6 synced under {}",
        home_ckpts.display()
    );
    // The push, with the token from asimov's secret file.
    let commits = hub.commits();
    assert_eq!(commits.len(), 1, "{:?}", hub.requests());
    assert!(commits[0].files.contains_key("model.safetensors"));
    assert!(!log.contains(TOKEN), "the token is not in the log");
}
