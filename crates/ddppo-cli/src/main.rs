//! The `ddppo` command-line tool. It parses, validates, wires and reports;
//! the algorithms live in the library crates.
//!
//! Exit codes: 0 success, 1 an error (one line `error: ...` on stderr), 2 a
//! command-line usage error (one line ending in a pointer to `--help`), 75
//! a training run stopped by a signal after a complete checkpoint.

/// `println!` that ignores a closed stdout (`ddppo ... | head -1`) instead of
/// panicking: the output is a courtesy, the work goes on.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that ignores a closed stderr, as [`say!`].
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod chart;
mod cmd_checkpoint;
mod cmd_config;
mod cmd_device_check;
mod cmd_env;
mod cmd_eval;
mod cmd_grad_error;
mod cmd_plot;
mod cmd_profile;
mod cmd_table;
mod cmd_train;
mod cmd_variant;
mod device;
mod run_dir;
mod tensorboard;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ddppo", version, about = "DDPPO: policy optimisation by back-propagating through a learned model")]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train an agent (preset per task; --set overrides any key).
    Train(cmd_train::TrainArgs),
    /// Evaluate a run's newest checkpoint (deterministic policy).
    Eval(cmd_eval::EvalArgs),
    /// List the environments, or replay actions through one.
    Env(cmd_env::EnvArgs),
    /// The gradient-error study (paper Figure 2) on an analytic env.
    GradError(cmd_grad_error::GradErrorArgs),
    /// Learning curves of run directories (mean and std band over seeds).
    Plot(cmd_plot::PlotArgs),
    /// A Markdown table of returns (mean ± std over seeds) at fixed step counts.
    Table(cmd_table::TableArgs),
    /// List the algorithm variants (`--variant`).
    Variant(cmd_variant::VariantArgs),
    /// Print the resolved config of `ddppo train` with the same arguments (TOML).
    Config(cmd_config::ConfigArgs),
    /// A run's checkpoints (`latest`: the newest complete one).
    Checkpoint(cmd_checkpoint::CheckpointArgs),
    /// Check that a device (cuda) computes what the CPU does, within f32 tolerance.
    DeviceCheck(cmd_device_check::DeviceCheckArgs),
    /// Time each phase of a preset's env step at given sizes of D_env; project seconds per 1,000 env steps.
    ///
    /// D_env is filled with N real transitions of the task (uniform random actions from the preset's
    /// seed: the run's own first N when N <= start_steps), recorded once into --data-dir and reused.
    /// On a fresh agent of the preset, unchanged but for --max-epochs, it times one model training
    /// (Agent::train_models: both ensembles, each with its epochs and seconds), one model rollout of
    /// rollout_batch_size rows at the schedule's k for N env steps, --update-steps env steps of
    /// updates (G2 critic and G1 policy updates each) and one evaluation (episodes and Jacobian
    /// diagnostics). Projected seconds per 1,000 env steps:
    ///
    ///   1000/model_train_freq x (train s + rollout s) + 1000 x (critic s + policy s per env step)
    ///   + 1000/eval_every x eval s
    ///
    /// The timed training starts cold, as a run's first at min_pool_size; a run's later trainings start
    /// from the previous models and run another number of epochs (measured: tenfold differences), so
    /// read the epochs column beside the seconds. Collecting (under 1%) is not counted. Progress lines
    /// go to stderr, the table (Markdown) to stdout.
    Profile(cmd_profile::ProfileArgs),
}

fn main() {
    // candle's CPU matmuls and the neighbour queries run on rayon's pool; its
    // workers spin-wait, and with the evaluation threads beside them that was
    // up to 50x slower on 2 busy cores (ddppo-agent's and ddppo-models'
    // benches). One thread unless the user asks for more.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: no other thread exists yet this early in main.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    // Large tensors reuse freed memory instead of a fresh mmap each step.
    ddppo_models::tune_allocator();
    let cli = Cli::try_parse().unwrap_or_else(|e| usage_error(e));
    let result = match cli.cmd {
        Command::Train(args) => cmd_train::run(args),
        Command::Eval(args) => cmd_eval::run(args),
        Command::Env(args) => cmd_env::run(args),
        Command::GradError(args) => cmd_grad_error::run(args),
        Command::Plot(args) => cmd_plot::run(args),
        Command::Table(args) => cmd_table::run(args),
        Command::Variant(args) => cmd_variant::run(args),
        Command::Config(args) => cmd_config::run(args),
        Command::Checkpoint(args) => cmd_checkpoint::run(args),
        Command::DeviceCheck(args) => cmd_device_check::run(args),
        Command::Profile(args) => cmd_profile::run(args),
    };
    if let Err(e) = result {
        if e.is::<cmd_train::Interrupted>() {
            note!("{e}");
            std::process::exit(cmd_train::EXIT_INTERRUPTED);
        }
        // The reader of our output went away (`ddppo env list | head -1`):
        // nothing is wrong and nobody is left to tell.
        if e.chain()
            .any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
        {
            std::process::exit(0);
        }
        // One line: the cause chain, no backtrace (some causes, e.g. TOML
        // errors with a source excerpt, span several lines).
        note!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// Help and version print as clap has them (exit 0); a usage mistake is
/// one line, clap's message and tip without the usage block, with a pointer
/// to the right `--help` (exit 2).
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    note!("{}; see `{} --help`", usage_line(&e.render().to_string()), command_path());
    std::process::exit(2);
}

/// The subcommand the arguments name (`ddppo env replay`), as far as they
/// name one.
fn command_path() -> String {
    let mut cmd = Cli::command();
    let mut path = vec![cmd.get_name().to_string()];
    for arg in std::env::args().skip(1) {
        let Some(sub) = cmd.find_subcommand(&arg).cloned() else { break };
        path.push(sub.get_name().to_string());
        cmd = sub;
    }
    path.join(" ")
}

/// Folds clap's rendered error (an `error: ...` paragraph, `tip:`
/// paragraphs, then `Usage: ...` and `For more information, try '--help'.`,
/// which are dropped) into one line.
fn usage_line(rendered: &str) -> String {
    let fold = |p: &str| p.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut message = String::new();
    for paragraph in rendered.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        if paragraph.starts_with("tip:") {
            message.push_str(&format!(" ({})", fold(paragraph)));
        } else if message.is_empty() {
            message = fold(paragraph);
        }
    }
    if !message.starts_with("error:") {
        message = format!("error: {message}");
    }
    message.trim_end_matches('.').to_string()
}

/// The error's cause chain on one line. Library errors that wrap another
/// crate's error already print it, so a cause whose text the previous message
/// contains is not repeated; multi-line causes are folded.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if parts.last().is_some_and(|prev| prev.contains(&text)) {
            continue;
        }
        parts.push(text);
    }
    let joined = parts.join(": ");
    joined.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}
