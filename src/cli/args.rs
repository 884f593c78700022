//! The command line's shape (clap derive). Verbs and flags are a contract: DESIGN.md
//! "Contracts that tests and scripts rely on".

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "asimov",
    version,
    about = "Declarative controller for ML training jobs on rented GPUs",
    long_about = "Write what should run as YAML manifests (jobs, fleets, budgets); asimov \
                  creates, configures, restarts from checkpoint and destroys instances until \
                  reality matches. State lives in $ASIMOV_HOME (default ~/.asimov).",
    after_help = "Run `asimov` alone on a terminal to fine-tune a Hugging Face model in six questions.\n\n\
                  Examples:\n  asimov\n  asimov apply -f job.yaml --wait\n  asimov get runs\n  asimov logs swag-train-0 -f\n  asimov destroy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add or update jobs, fleets and budgets from manifest files or folders
    #[command(
        after_help = "Examples:\n  asimov apply -f job.yaml --wait\n  asimov apply -f manifests/ --dry-run"
    )]
    Apply {
        /// Manifest files or folders of them (*.yaml, *.yml)
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Print what would change, and change nothing: the spec diff, and for each run
        /// the placement and offer it would take now, its price and its budget
        #[arg(long)]
        dry_run: bool,
        /// Show a progress bar per run until every run ends; exit non-zero if any fails
        #[arg(long)]
        wait: bool,
        /// How `--dry-run` prints its plan
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table, requires = "dry_run")]
        output: Output,
    },
    /// Delete a job (destroying its instances) or every object in manifest files
    #[command(
        after_help = "Examples:\n  asimov delete job swag-train\n  asimov delete -f job.yaml --no-wait"
    )]
    Delete {
        /// `job NAME`, `fleet NAME` or `budget NAME`
        #[arg(num_args = 0..=2)]
        target: Vec<String>,
        /// Delete the objects these manifest files define
        #[arg(short = 'f', long = "filename", num_args = 1..)]
        files: Vec<PathBuf>,
        /// Return at once instead of waiting until every instance is confirmed gone
        #[arg(long)]
        no_wait: bool,
    },
    /// List objects: jobs, runs, fleets, budgets
    #[command(after_help = "Examples:\n  asimov get runs\n  asimov get runs -o json")]
    Get {
        kind: Kind,
        name: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show one object's spec, status and events
    #[command(after_help = "Example:\n  asimov describe run swag-train-0")]
    Describe { kind: Kind, name: String },
    /// Print a run's log
    #[command(after_help = "Example:\n  asimov logs swag-train-0 -f")]
    Logs {
        run: String,
        /// Keep printing as the log grows, until the run ends
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Run the controller in the foreground
    #[command(
        after_help = "Examples:\n  asimov controller\n  asimov controller --manifests ./deploy --once"
    )]
    Controller {
        /// Watch this folder of manifests instead of $ASIMOV_HOME/manifests
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// Do one reconcile pass and exit
        #[arg(long)]
        once: bool,
        /// Started by `apply`: detach from the terminal, log to $ASIMOV_HOME/controller.log
        #[arg(long, hide = true)]
        background: bool,
    },
    /// Store a secret (read from stdin, never from the command line) for jobs' `secrets:`
    #[command(
        after_help = "Examples:\n  asimov secret set VAST_API_KEY < vast.key\n  asimov secret list"
    )]
    Secret {
        #[command(subcommand)]
        action: SecretAction,
    },
    /// Prepare every host of a fleet for runs (idempotent): agent folder, tmux, GPU inventory
    #[command(after_help = "Example:\n  asimov prepare lab")]
    Prepare {
        /// The Fleet's name
        fleet: String,
    },
    /// Search the providers' offers for what a job (or the flags) asks, cheapest first
    #[command(
        after_help = "Examples:\n  asimov offers --gpu H100 --count 1 --max-price 3\n  asimov offers -f job.yaml -o json\n  asimov offers --gpu RTX_4090 --pick --premium 10 -f job.yaml --write"
    )]
    Offers {
        /// Take the resources and placements of the (first) job in this manifest
        #[arg(short = 'f', long = "filename")]
        file: Option<PathBuf>,
        /// Only this provider: vast, lambda or runpod (default: every cloud with a key)
        #[arg(long)]
        provider: Option<String>,
        /// GPU name as you write it (`H100` matches every H100; `RTX_4090` = `RTX 4090`); repeatable
        #[arg(long = "gpu")]
        gpus: Vec<String>,
        /// GPUs per instance
        #[arg(long)]
        count: Option<u32>,
        /// Minimum memory per GPU, GB
        #[arg(long = "min-vram")]
        min_vram: Option<u32>,
        /// Highest price per hour, USD
        #[arg(long = "max-price")]
        max_price: Option<f64>,
        /// Vast offer filters as `FIELD=EXPR`, e.g. `reliability=>=0.98`; repeatable
        #[arg(long = "filter")]
        filters: Vec<String>,
        /// Interruptible (bid) prices: `premium_pct` over the minimum bid
        #[arg(long)]
        spot: bool,
        #[arg(long, value_enum, default_value_t = OfferSort::Price)]
        sort: OfferSort,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Choose one offer on a terminal and print the placement entry that rents it
        #[arg(long)]
        pick: bool,
        /// With --pick: percent over the offer's price, as the price cap (or the bid with --spot)
        #[arg(long, value_name = "PCT")]
        premium: Option<f64>,
        /// With --pick and -f: write the entry as the job's first placement
        #[arg(long)]
        write: bool,
    },
    /// Store a cloud's API key, asked without echo and checked with the cloud
    #[command(after_help = "Examples:\n  asimov login vast\n  asimov login lambda")]
    Login {
        /// vast, lambda or runpod
        #[arg(value_enum)]
        cloud: Cloud,
    },
    /// Measure asimov's own speed and print the figures
    #[command(after_help = "Example:\n  asimov bench --runs 1000 --idle-seconds 5")]
    Bench {
        /// Runs in the store for the `get runs` figure
        #[arg(long, default_value_t = 10_000)]
        runs: usize,
        /// Jobs for the reconcile-pass figure
        #[arg(long, default_value_t = 1_000)]
        jobs: usize,
        /// Seconds to sample an idle controller's CPU use
        #[arg(long, default_value_t = 10)]
        idle_seconds: u64,
        /// Take only these figures (comma-separated); all of them when left out
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<BenchFigure>,
        /// Only seed the empty store of $ASIMOV_HOME with --runs synthetic runs, then exit
        /// (for scripts/bench-compare.sh); a store that holds runs is refused
        #[arg(long)]
        seed_only: bool,
    },
    /// Set or replace the Hugging Face token (asked without echo, kept 0600 as HF_TOKEN)
    #[command(after_help = "Examples:\n  asimov token\n  asimov token --show-source")]
    Token {
        /// Say where the token is kept (never its value)
        #[arg(long)]
        show_source: bool,
    },
    /// Destroy a run's instance and stop the run for good (until its job changes)
    #[command(after_help = "Examples:\n  asimov destroy\n  asimov destroy ft-smollm2-0 --yes")]
    Destroy {
        /// The run; may be left out when exactly one run has an instance
        run: Option<String>,
        /// Do not ask for confirmation (needed without a terminal)
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Open a shell on the machine of a run's instance (in the job's working folder)
    #[command(after_help = "Example:\n  asimov ssh swag-train-0")]
    Ssh {
        /// The run
        run: String,
    },
    /// Attach to a run's own tmux session, read-only (Ctrl-b d detaches; the run goes on)
    #[command(after_help = "Example:\n  asimov attach swag-train-0")]
    Attach {
        /// The run
        run: String,
    },
    /// Pause a run (or every run of a job): sync its checkpoint, destroy its instance
    #[command(after_help = "Examples:\n  asimov pause swag-train-0\n  asimov pause swag-train")]
    Pause {
        /// A run, or a job (all its runs)
        name: String,
    },
    /// Resume a paused run (or job): a new attempt from its latest checkpoint
    #[command(after_help = "Examples:\n  asimov resume swag-train-0\n  asimov resume swag-train")]
    Resume {
        /// A run, or a job (all its paused runs)
        name: String,
    },
    /// Write a job manifest for the project in this folder (Python, requirements, CUDA, git)
    #[command(after_help = "Examples:\n  asimov init\n  asimov init --yes")]
    Init {
        /// Take every default without asking (an existing different manifest is kept)
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Print a shell completion script
    #[command(
        after_help = "Examples:\n  asimov completions bash > ~/.local/share/bash-completion/completions/asimov\n  asimov completions zsh > ~/.zfunc/_asimov\n  asimov completions fish > ~/.config/fish/completions/asimov.fish"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretAction {
    /// Save NAME's value from standard input into a file of mode 0600
    #[command(after_help = "Example:\n  asimov secret set HF_TOKEN < token.txt")]
    Set { name: String },
    /// Remove a secret
    #[command(after_help = "Example:\n  asimov secret rm HF_TOKEN")]
    Rm { name: String },
    /// List secret names (never values)
    #[command(after_help = "Example:\n  asimov secret list")]
    List,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    #[value(alias = "job")]
    Jobs,
    #[value(alias = "run")]
    Runs,
    #[value(alias = "fleet")]
    Fleets,
    #[value(alias = "budget")]
    Budgets,
}

/// One figure of `asimov bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchFigure {
    GetRuns,
    Reconcile,
    Idle,
    Metrics,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Cloud {
    Vast,
    Lambda,
    Runpod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OfferSort {
    /// Cheapest first
    Price,
    /// Most DL performance (Vast `dlperf`) per dollar first
    PerfPerDollar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}
