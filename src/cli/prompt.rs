//! `asimov` alone on a terminal: the fine-tuning prompt. Six questions (model, dataset,
//! subset, hub repository, GPU, GPU count; the Hugging Face token first, once ever),
//! then the job it will create, then — on confirmation — the same path as
//! `asimov apply -f job.yaml --wait`: the manifest stored, the controller started, a
//! progress bar until the run ends. Ctrl-C or Esc at any question changes nothing.

use super::finetune::{self, Answers, Target};
use super::{CliError, CliResult, fail, token};
use crate::home::{Home, write_private};
use inquire::validator::Validation;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

/// The exit code of a prompt left by Ctrl-C or Esc (as a shell reports SIGINT).
const CANCELLED: u8 = 130;

/// True when questions can be asked: both the keyboard and the screen are a terminal.
pub fn on_terminal() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// A prompt left by Ctrl-C or Esc ends quietly with code 130; anything else is an error.
pub fn cancelled_or(err: CliError) -> CliResult {
    match err.downcast_ref::<inquire::InquireError>() {
        Some(
            inquire::InquireError::OperationInterrupted | inquire::InquireError::OperationCanceled,
        ) => {
            eprintln!("Cancelled; nothing was changed.");
            Ok(ExitCode::from(CANCELLED))
        }
        _ => Err(err),
    }
}

/// A GPU the prompt offers, with what is known of its price.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuChoice {
    pub name: String,
    pub vram_gb: u32,
    /// USD per hour per GPU (the cheapest live offer's), when a provider quoted it.
    pub price_per_hour: Option<f64>,
    /// Live offers of this GPU (0 for the built-in list).
    pub offers: usize,
}

impl std::fmt::Display for GpuChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<10} {:>3} GB", self.name, self.vram_gb)?;
        if let Some(p) = self.price_per_hour {
            write!(f, "  from ${p:.2}/h per GPU")?;
        }
        if self.offers > 0 {
            write!(
                f,
                "  ({} offer{})",
                self.offers,
                if self.offers == 1 { "" } else { "s" }
            )?;
        }
        Ok(())
    }
}

/// How long the GPU question waits for live offers before it shows the built-in list.
const LIVE_OFFERS_WAIT: Duration = Duration::from_secs(15);

/// Live offers being fetched since the prompt started: by the GPU question (four
/// answers later) the provider has usually answered, and the question waits only for
/// whatever of its answer time is left.
pub struct LiveOffers {
    answer: mpsc::Receiver<Result<Vec<GpuChoice>, String>>,
}

/// Starts fetching live offers when the job will run on a cloud; `None` on `local`.
pub fn fetch_live_offers(home: &Home, target: Target) -> Option<LiveOffers> {
    if target != Target::Vast {
        return None;
    }
    let home = home.clone();
    let (tx, answer) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(vast_choices(&home));
    });
    Some(LiveOffers { answer })
}

/// Vast's offers of one GPU or more, one choice per GPU model at its cheapest price
/// per GPU, cheapest first.
fn vast_choices(home: &Home) -> Result<Vec<GpuChoice>, String> {
    use crate::manifest::{GpuRequest, Placement, Resources};
    let provider =
        crate::provider::vast::VastProvider::searcher(home).map_err(|e| e.to_string())?;
    let resources = Resources {
        gpu: Some(GpuRequest {
            names: Vec::new(),
            count: 1,
            min_vram_gb: None,
        }),
        ..Resources::default()
    };
    let placement = Placement {
        provider: crate::model::ProviderKind::Vast,
        ..Placement::local()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let offers = runtime
        .block_on(provider.search(&resources, &placement))
        .map_err(|e| e.to_string())?;
    let mut by_gpu: Vec<GpuChoice> = Vec::new();
    for offer in offers.iter().filter(|o| o.num_gpus > 0) {
        let per_gpu = offer.price(&placement) / f64::from(offer.num_gpus);
        let vram = offer.vram_gb.round().clamp(0.0, f64::from(u32::MAX)) as u32;
        match by_gpu.iter_mut().find(|c| c.name == offer.gpu_name) {
            Some(c) => {
                c.offers += 1;
                c.vram_gb = c.vram_gb.max(vram);
                if c.price_per_hour.is_none_or(|p| per_gpu < p) {
                    c.price_per_hour = Some(per_gpu);
                }
            }
            None => by_gpu.push(GpuChoice {
                name: offer.gpu_name.clone(),
                vram_gb: vram,
                price_per_hour: Some(per_gpu),
                offers: 1,
            }),
        }
    }
    by_gpu.sort_by(|a, b| {
        a.price_per_hour
            .partial_cmp(&b.price_per_hour)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    Ok(by_gpu)
}

/// GPUs ML engineers commonly rent, largest first.
const BUILT_IN_GPUS: &[(&str, u32)] = &[
    ("H200", 141),
    ("H100", 80),
    ("A100", 80),
    ("L40S", 48),
    ("RTX A6000", 48),
    ("A40", 48),
    ("RTX 4090", 24),
    ("RTX 3090", 24),
    ("L4", 24),
    ("A10", 24),
    ("V100", 32),
    ("T4", 16),
];

/// The GPUs to offer: the live offers when they were asked for and came within
/// [`LIVE_OFFERS_WAIT`], else the built-in list (saying why on stderr).
pub fn gpu_choices(live: Option<LiveOffers>) -> Vec<GpuChoice> {
    if let Some(live) = live {
        match live.answer.recv_timeout(LIVE_OFFERS_WAIT) {
            Ok(Ok(choices)) if !choices.is_empty() => return choices,
            Ok(Ok(_)) => eprintln!("No live offers right now; showing the usual GPUs."),
            Ok(Err(why)) => eprintln!("Live offers unavailable ({why}); showing the usual GPUs."),
            Err(_) => eprintln!(
                "Live offers did not come within {}s; showing the usual GPUs.",
                LIVE_OFFERS_WAIT.as_secs()
            ),
        }
    }
    BUILT_IN_GPUS
        .iter()
        .map(|(name, vram_gb)| GpuChoice {
            name: (*name).to_string(),
            vram_gb: *vram_gb,
            price_per_hour: None,
            offers: 0,
        })
        .collect()
}

/// Where the prompt's job runs: Vast when its key is configured and this asimov drives
/// it, else this machine.
pub fn target(home: &Home) -> Target {
    let vast_key = home.credentials().join("VAST_API_KEY").is_file()
        || std::env::var_os("VAST_API_KEY").is_some_and(|v| !v.is_empty());
    if vast_key && crate::reconcile::controller::drives(crate::model::ProviderKind::Vast) {
        Target::Vast
    } else {
        Target::Local
    }
}

/// The last answers, or the template's defaults when there are none (or they do not
/// parse: a remembered default is a convenience, never a reason to fail).
pub fn remembered(home: &Home) -> Answers {
    std::fs::read(home.prompt_answers())
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn remember(home: &Home, a: &Answers) -> Result<(), CliError> {
    let json = serde_json::to_vec_pretty(a)?;
    write_private(&home.prompt_answers(), &json)?;
    Ok(())
}

/// `owner/name` or `name`, the way the hub names models and datasets.
fn repo_id_problem(s: &str) -> Option<String> {
    let s = s.trim();
    if s.is_empty() {
        return Some("required".into());
    }
    if s.split('/').count() > 2 || s.starts_with('/') || s.ends_with('/') {
        return Some("expected a hub id like owner/name".into());
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    {
        return Some("a hub id holds letters, digits, - _ . and one /".into());
    }
    None
}

fn repo_id_validator(input: &str) -> Result<Validation, inquire::CustomUserError> {
    Ok(match repo_id_problem(input) {
        Some(why) => Validation::Invalid(why.into()),
        None => Validation::Valid,
    })
}

/// Models people fine-tune first; typed text filters them.
const SUGGESTED_MODELS: &[&str] = &[
    "HuggingFaceTB/SmolLM2-135M",
    "HuggingFaceTB/SmolLM2-360M",
    "Qwen/Qwen2.5-0.5B",
    "Qwen/Qwen2.5-1.5B",
    "meta-llama/Llama-3.2-1B",
    "mistralai/Mistral-7B-v0.3",
    "google/gemma-2-2b",
];

fn suggest_models(input: &str) -> Result<Vec<String>, inquire::CustomUserError> {
    let needle = input.to_lowercase();
    Ok(SUGGESTED_MODELS
        .iter()
        .filter(|m| m.to_lowercase().contains(&needle))
        .map(|m| m.to_string())
        .collect())
}

/// `asimov` with no arguments.
pub fn run(home: &Home) -> CliResult {
    if !on_terminal() {
        return Err(fail(
            "`asimov` alone asks its questions on a terminal, and this is not one; \
             write a job manifest and use `asimov apply -f job.yaml` \
             (examples/hf-finetune/job.yaml is the fine-tuning template)",
        ));
    }
    match ask_and_apply(home) {
        Ok(code) => Ok(code),
        Err(e) => cancelled_or(e),
    }
}

fn ask_and_apply(home: &Home) -> CliResult {
    eprintln!("asimov: fine-tune a Hugging Face model (Ctrl-C leaves, changing nothing)");
    let last = remembered(home);
    let target = target(home);
    let live = fetch_live_offers(home, target);
    let user = if token::stored(home) {
        None
    } else {
        token::ask_and_save(home, "Hugging Face token:")?
    };
    let (answers, gpu) = ask(&last, user.as_deref(), live)?;
    let manifest = finetune::render(&answers, target);
    eprintln!();
    eprintln!("This job will be created:");
    eprintln!();
    for line in manifest.lines() {
        eprintln!("  {line}");
    }
    eprintln!();
    match target {
        Target::Local => eprintln!(
            "Placement: local (no cloud is configured, so it runs on this machine, free; \
             the GPU choice applies once a cloud is configured)"
        ),
        Target::Vast => eprintln!(
            "Placement: vast; price per hour: {}",
            gpu.price_per_hour
                .map(|p| p * f64::from(answers.gpu_count))
                .map_or("quoted when an offer is found".to_string(), |p| format!(
                    "from ${p:.2}/h for {} x {}",
                    answers.gpu_count, answers.gpu
                ))
        ),
    }
    let go = inquire::Confirm::new("Create and start this job?")
        .with_default(true)
        .prompt()?;
    if !go {
        eprintln!("Not applied; nothing was changed.");
        return Ok(ExitCode::SUCCESS);
    }
    home.ensure()?;
    remember(home, &answers)?;
    let path = finetune::write_job_folder(home, &answers, target)?;
    eprintln!("Manifest: {}", path.display());
    super::apply::run(home, &[path], false, true)
}

/// The six answers, and the GPU chosen as it was offered (with its price, if live).
fn ask(
    last: &Answers,
    user: Option<&str>,
    live: Option<LiveOffers>,
) -> Result<(Answers, GpuChoice), CliError> {
    let model = inquire::Text::new("Model to fine-tune:")
        .with_default(&last.model)
        .with_autocomplete(suggest_models)
        .with_help_message("a Hugging Face model id; Tab completes, Enter takes the default")
        .with_validator(repo_id_validator)
        .prompt()?
        .trim()
        .to_string();
    let dataset = inquire::Text::new("Dataset:")
        .with_default(&last.dataset)
        .with_help_message("a Hugging Face dataset id")
        .with_validator(repo_id_validator)
        .prompt()?
        .trim()
        .to_string();
    let last_subset = last.subset.clone().unwrap_or_default();
    let subset = inquire::Text::new("Dataset subset (optional):")
        .with_initial_value(&last_subset)
        .with_help_message("the dataset's configuration name; leave empty for none")
        .prompt()?
        .trim()
        .to_string();
    let model_name = model.rsplit('/').next().unwrap_or(&model).to_string();
    let suggested_repo = match (last.hub_repo.is_empty(), user) {
        (false, _) => last.hub_repo.clone(),
        (true, Some(u)) => format!("{u}/{model_name}-finetuned"),
        (true, None) => String::new(),
    };
    let mut repo_question = inquire::Text::new("Hub repository for the fine-tuned model:")
        .with_help_message("owner/name; created private if it does not exist")
        .with_validator(|s: &str| {
            Ok(match repo_id_problem(s) {
                None if !s.contains('/') => Validation::Invalid("expected owner/name".into()),
                None => Validation::Valid,
                Some(why) => Validation::Invalid(why.into()),
            })
        });
    if !suggested_repo.is_empty() {
        repo_question = repo_question.with_default(&suggested_repo);
    }
    let hub_repo = repo_question.prompt()?.trim().to_string();
    let gpus = gpu_choices(live);
    let start = gpus.iter().position(|g| g.name == last.gpu).unwrap_or(0);
    let chosen = inquire::Select::new("GPU:", gpus)
        .with_starting_cursor(start)
        .with_help_message("type to filter, arrows to move, Enter to choose")
        .prompt()?;
    let gpu = chosen.name.clone();
    let gpu_count = inquire::CustomType::<u32>::new("GPU count:")
        .with_default(last.gpu_count.clamp(1, 8))
        .with_error_message("a whole number from 1 to 8")
        .with_validator(|n: &u32| {
            Ok(if (1..=8).contains(n) {
                Validation::Valid
            } else {
                Validation::Invalid("from 1 to 8".into())
            })
        })
        .prompt()?;
    let answers = Answers {
        model,
        dataset,
        subset: Some(subset).filter(|s| !s.is_empty()),
        hub_repo,
        gpu,
        gpu_count,
    };
    Ok((answers, chosen))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert_eq!(repo_id_problem("Qwen/Qwen2.5-0.5B"), None);
        assert_eq!(repo_id_problem("gpt2"), None);
        assert!(repo_id_problem("").is_some());
        assert!(repo_id_problem("a/b/c").is_some());
        assert!(repo_id_problem("a b").is_some());
        assert!(repo_id_problem("/x").is_some());
    }

    #[test]
    fn remembered_answers_survive_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        assert_eq!(remembered(&home), Answers::default());
        std::fs::write(home.prompt_answers(), "{not json").unwrap();
        assert_eq!(remembered(&home), Answers::default());
        let a = Answers {
            hub_repo: "ada/x".into(),
            gpu_count: 4,
            ..Answers::default()
        };
        remember(&home, &a).unwrap();
        assert_eq!(remembered(&home), a);
    }
}
