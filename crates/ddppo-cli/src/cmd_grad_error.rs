//! `ddppo grad-error`: the gradient-error study of the paper's Figure 2.
//!
//! Collects random-policy data on an analytic env, trains the same ensemble
//! with and without the gradient loss, and writes `curves.csv`,
//! `summary.json` and `grad_error.svg` into `--out`.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ddppo_agent::grad_error::{CurvePoint, StudyConfig, StudyEnv, VARIANTS, run_study};

use crate::chart::{Panel, Series, mean_std, write_svg};

#[derive(clap::Args)]
pub struct GradErrorArgs {
    /// The analytic env: pendulum or linear.
    #[arg(long)]
    env: String,
    /// Study config (TOML): sizes, epochs, n and w, the linear system's A, B, Q, R.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Number of seeds (runs per variant).
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: GradErrorArgs) -> Result<()> {
    let env = StudyEnv::from_name(&args.env)?;
    let cfg = match &args.config {
        Some(path) => StudyConfig::from_file(path)?,
        None => StudyConfig::default(),
    };
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    prepare_out(&args.out)?;
    let total = args.seeds * VARIANTS.len() * cfg.epochs;
    let mut done = 0usize;
    let study = run_study(env, &cfg, args.seeds, &mut |p: &CurvePoint| {
        done += 1;
        if p.epoch == cfg.epochs {
            note!(
                "[{done}/{total}] seed {} {}: pred_mse {:.3e} grad_mse {:.3e}",
                p.seed,
                p.variant,
                p.pred_mse,
                p.grad_mse
            );
        }
    })?;
    write_curves(&args.out.join("curves.csv"), &study.curves)?;
    let summary = serde_json::to_string_pretty(&study.summary)?;
    std::fs::write(args.out.join("summary.json"), summary + "\n")
        .with_context(|| format!("cannot write {}", args.out.join("summary.json").display()))?;
    plot(&args.out.join("grad_error.svg"), env, &study.curves, cfg.epochs)?;
    for v in &study.summary.variants {
        say!(
            "{:<17} pred_mse {:.3e} ± {:.1e}   grad_mse {:.3e} ± {:.1e}   (reward row {:.3e}, dynamics rows {:.3e})",
            v.variant,
            v.pred_mse.mean,
            v.pred_mse.std,
            v.grad_mse.mean,
            v.grad_mse.std,
            v.grad_mse_reward.mean,
            v.grad_mse_dynamics.mean
        );
    }
    say!("gradient MSE ratio (with / without the loss): {:.3}", study.summary.grad_mse_ratio);
    say!("wrote {}/{{curves.csv,summary.json,grad_error.svg}}", args.out.display());
    Ok(())
}

fn prepare_out(out: &Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("--out {} exists and is not a directory", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))
}

fn write_curves(path: &Path, curves: &[CurvePoint]) -> Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "variant,seed,epoch,pred_mse,grad_mse,grad_mse_reward,grad_mse_dynamics")?;
    for p in curves {
        writeln!(
            f,
            "{},{},{},{:e},{:e},{:e},{:e}",
            p.variant, p.seed, p.epoch, p.pred_mse, p.grad_mse, p.grad_mse_reward, p.grad_mse_dynamics
        )?;
    }
    Ok(())
}

/// Two panels like the paper's Figure 2: prediction error and gradient error per
/// epoch, mean over seeds with a one-std band, one curve per variant.
fn plot(path: &Path, env: StudyEnv, curves: &[CurvePoint], epochs: usize) -> Result<()> {
    let series = |metric: fn(&CurvePoint) -> f64| -> Vec<Series> {
        VARIANTS
            .iter()
            .map(|variant| {
                let (mut x, mut mean, mut std) = (Vec::new(), Vec::new(), Vec::new());
                for epoch in 1..=epochs {
                    let v: Vec<f64> =
                        curves.iter().filter(|p| p.variant == *variant && p.epoch == epoch).map(metric).collect();
                    if v.is_empty() {
                        continue;
                    }
                    let (m, s) = mean_std(&v);
                    x.push(epoch as f64);
                    mean.push(m);
                    std.push(s);
                }
                Series { label: variant.replace('_', " "), x, mean, std }
            })
            .collect()
    };
    let panels = [
        Panel {
            title: format!("{}: prediction error", env.name()),
            x_label: "epoch".into(),
            y_label: "holdout MSE".into(),
            log_y: true,
            series: series(|p| p.pred_mse),
        },
        Panel {
            title: format!("{}: gradient error", env.name()),
            x_label: "epoch".into(),
            y_label: "Jacobian MSE".into(),
            log_y: true,
            series: series(|p| p.grad_mse),
        },
    ];
    write_svg(path, &panels)
}
