//! The hf-finetune template (`examples/hf-finetune/`): the answers of the `asimov` prompt
//! turned into a job manifest and the folder it uploads. The template fixes the image,
//! setup, run command and checkpoint path; the prompt fills only the answers, so the
//! docker image cannot be changed from it.

use crate::home::Home;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

/// The template's image: CUDA and torch preinstalled on cloud instances (the `local`
/// provider runs on this machine and ignores it).
pub const IMAGE: &str = "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime";

/// The files uploaded with every fine-tune, from `examples/hf-finetune/`.
const FILES: &[(&str, &str)] = &[
    (
        "train.py",
        include_str!("../../examples/hf-finetune/train.py"),
    ),
    (
        "requirements.txt",
        include_str!("../../examples/hf-finetune/requirements.txt"),
    ),
    (
        "setup.sh",
        include_str!("../../examples/hf-finetune/setup.sh"),
    ),
    ("run.sh", include_str!("../../examples/hf-finetune/run.sh")),
];

/// What the prompt asks; also the remembered defaults of the next prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answers {
    pub model: String,
    pub dataset: String,
    /// The dataset's configuration; `None` for datasets that have one.
    #[serde(default)]
    pub subset: Option<String>,
    pub hub_repo: String,
    pub gpu: String,
    pub gpu_count: u32,
}

impl Default for Answers {
    fn default() -> Self {
        Answers {
            model: "HuggingFaceTB/SmolLM2-135M".into(),
            dataset: "yahma/alpaca-cleaned".into(),
            subset: None,
            hub_repo: String::new(),
            gpu: "RTX 4090".into(),
            gpu_count: 1,
        }
    }
}

/// Where the job runs: the prompt picks it, the template does not fix it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// This machine (no cloud configured): a newcomer sees it work at once.
    Local,
    /// Vast.ai, when its API key is configured.
    Vast,
}

impl Target {
    pub fn provider(self) -> &'static str {
        match self {
            Target::Local => "local",
            Target::Vast => "vast",
        }
    }
}

/// The job's name: `ft-` and the hub repository's name (else the model's), as a
/// manifest name allows (lowercase letters, digits, `-`; at most 40 characters).
pub fn job_name(a: &Answers) -> String {
    let from = if a.hub_repo.is_empty() {
        &a.model
    } else {
        &a.hub_repo
    };
    let base = from.rsplit('/').next().unwrap_or(from);
    let mut name = String::from("ft-");
    for c in base.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            name.push(c);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    name.truncate(40);
    let trimmed = name.trim_end_matches('-');
    if trimmed == "ft" {
        "ft-model".into()
    } else {
        trimmed.to_string()
    }
}

/// A YAML scalar that means exactly `s` (a JSON string is a YAML double-quoted one).
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// The job manifest for these answers.
pub fn render(a: &Answers, target: Target) -> String {
    let mut env = vec![
        ("HF_MODEL", a.model.as_str()),
        ("HF_DATASET", a.dataset.as_str()),
    ];
    if let Some(subset) = a.subset.as_deref().filter(|s| !s.is_empty()) {
        env.push(("HF_DATASET_SUBSET", subset));
    }
    if !a.hub_repo.is_empty() {
        env.push(("HF_HUB_REPO", a.hub_repo.as_str()));
    }
    let env: String = env
        .iter()
        .map(|(k, v)| format!("    {k}: {}\n", quoted(v)))
        .collect();
    format!(
        "# Written by the `asimov` prompt from the hf-finetune template (examples/hf-finetune).\n\
         # The image, setup and run command are the template's; re-run `asimov` to change the rest.\n\
         apiVersion: asimov/v1\n\
         kind: Job\n\
         metadata:\n  name: {name}\n  labels: {{template: hf-finetune}}\n\
         spec:\n\
         \x20 source: {{workdir: .}}\n\
         \x20 setup: [\"sh setup.sh\"]\n\
         \x20 run: sh run.sh\n\
         \x20 env:\n{env}\
         \x20   CHECKPOINT_DIR: output/ckpt\n\
         \x20 secrets: [HF_TOKEN]\n\
         \x20 resources:\n    gpu: {{name: [{gpu}], count: {count}}}\n\
         \x20 placement:\n    - {{provider: {provider}}}\n\
         \x20 image: {image}\n\
         \x20 checkpoint: {{path: output/ckpt, every: 30m}}\n\
         \x20 retry: {{on: [no-capacity, preemption], max_restarts: 3}}\n",
        name = job_name(a),
        gpu = quoted(&a.gpu),
        count = a.gpu_count,
        provider = target.provider(),
        image = IMAGE,
    )
}

/// Where the prompt's job folders live: `$XDG_DATA_HOME/asimov/finetune` (else
/// `~/.local/share/asimov/finetune`). Not in `$ASIMOV_HOME`, which asimov never uploads.
fn jobs_root(home: &Home) -> io::Result<PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local/share"))
        })
        .ok_or_else(|| io::Error::other("neither XDG_DATA_HOME nor HOME is set"))?;
    let root = data.join("asimov").join("finetune");
    if root.starts_with(home.root()) {
        return Err(io::Error::other(format!(
            "the fine-tune folder {} would be inside {}, which asimov never uploads; \
             set XDG_DATA_HOME elsewhere",
            root.display(),
            home.root().display()
        )));
    }
    Ok(root)
}

/// `<data dir>/asimov/finetune/<job>/`: the template's files and `job.yaml`, written
/// fresh (the upload is exactly the template). Returns the manifest's path.
///
/// `ASIMOV_FINETUNE_TEMPLATE=DIR` replaces the built-in files by DIR's (for template
/// authors, and tests that must not download torch); the manifest stays the template's.
pub fn write_job_folder(home: &Home, a: &Answers, target: Target) -> io::Result<PathBuf> {
    let dir = jobs_root(home)?.join(job_name(a));
    std::fs::create_dir_all(&dir)?;
    match std::env::var_os("ASIMOV_FINETUNE_TEMPLATE").filter(|v| !v.is_empty()) {
        Some(custom) => copy_files(Path::new(&custom), &dir)?,
        None => {
            for (name, text) in FILES {
                std::fs::write(dir.join(name), text)?;
            }
        }
    }
    let manifest = dir.join("job.yaml");
    std::fs::write(&manifest, render(a, target))?;
    Ok(manifest)
}

fn copy_files(from: &Path, to: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers() -> Answers {
        Answers {
            hub_repo: "ada/SmolLM2-135M-alpaca".into(),
            ..Answers::default()
        }
    }

    #[test]
    fn job_names_are_manifest_names() {
        assert_eq!(job_name(&answers()), "ft-smollm2-135m-alpaca");
        let odd = Answers {
            hub_repo: "x/__".into(),
            ..Answers::default()
        };
        assert_eq!(job_name(&odd), "ft-model");
        let long = Answers {
            hub_repo: format!("x/{}", "a".repeat(80)),
            ..Answers::default()
        };
        assert_eq!(job_name(&long).len(), 40);
    }

    /// The checked-in example is what the prompt writes for the default answers.
    #[test]
    fn the_example_manifest_is_the_template() {
        let example = include_str!("../../examples/hf-finetune/job.yaml");
        let rendered = render(&answers(), Target::Local);
        if std::env::var_os("ASIMOV_UPDATE_EXAMPLES").is_some() {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hf-finetune/job.yaml");
            std::fs::write(path, &rendered).unwrap();
            return;
        }
        assert_eq!(
            example, rendered,
            "examples/hf-finetune/job.yaml drifted; rerun with ASIMOV_UPDATE_EXAMPLES=1"
        );
    }

    /// Whatever is typed, the manifest validates and keeps the answers and the image.
    #[test]
    fn rendered_manifests_validate_and_keep_the_answers() {
        let tricky = Answers {
            model: "org/model: with \"quotes\" # and hash".into(),
            dataset: "d\nnewline".into(),
            subset: Some("{braces}".into()),
            hub_repo: "ada/out".into(),
            gpu: "RTX 4090".into(),
            gpu_count: 2,
        };
        let text = render(&tricky, Target::Local);
        let ctx = crate::manifest::Context {
            secrets: ["HF_TOKEN".to_string()].into_iter().collect(),
            ..Default::default()
        };
        let loaded = crate::manifest::load_str(Path::new("/tmp/job.yaml"), &text, &ctx)
            .unwrap_or_else(|p| panic!("{p}\n{text}"));
        let job = &loaded.manifests.jobs[0];
        assert_eq!(job.spec.env["HF_MODEL"], tricky.model);
        assert_eq!(job.spec.env["HF_DATASET"], tricky.dataset);
        assert_eq!(job.spec.env["HF_DATASET_SUBSET"], "{braces}");
        assert_eq!(job.spec.image.as_deref(), Some(IMAGE));
        assert_eq!(job.spec.secrets, ["HF_TOKEN"]);
        let gpu = job.spec.resources.gpu.as_ref().unwrap();
        assert_eq!(gpu.count, 2);
    }
}
