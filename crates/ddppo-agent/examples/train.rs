//! Runs one training from a preset or config file with `key=value` overrides
//! and prints one JSON line per evaluation (experiments; the product CLI is
//! `ddppo train`).
//!
//! ```text
//! cargo run --release -p ddppo-agent --example train -- pendulum variant=\"sac\" epochs=10
//! cargo run --release -p ddppo-agent --example train -- configs/hopper.toml seed=3
//! ```

use ddppo_agent::{Agent, AgentConfig, EvalRecord, Observer};

struct Print;
impl Observer for Print {
    fn on_eval(&mut self, r: &EvalRecord) {
        match serde_json::to_string(r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("cannot serialise record: {e}"),
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let source = args.next().ok_or("usage: train <preset|config.toml> [key=value ...]")?;
    let base = if source.ends_with(".toml") {
        std::fs::read_to_string(&source)?
    } else {
        AgentConfig::preset(&source)?.to_toml()?
    };
    let mut table: toml::Table = toml::from_str(&base)?;
    for kv in args {
        let (k, v) = kv.split_once('=').ok_or_else(|| format!("override `{kv}` is not key=value"))?;
        let value: toml::Table = toml::from_str(&format!("x = {v}"))?;
        let value = value.get("x").cloned().ok_or("empty override")?;
        match k.split_once('.') {
            Some((section, key)) => {
                let sub = table.entry(section).or_insert_with(|| toml::Value::Table(Default::default()));
                sub.as_table_mut().ok_or("not a section")?.insert(key.to_string(), value);
            }
            None => {
                table.insert(k.to_string(), value);
            }
        }
    }
    let cfg = AgentConfig::from_toml_str(&toml::to_string(&table)?)?;
    eprintln!("{}", cfg.to_toml()?);
    let mut agent = Agent::new(cfg)?;
    agent.train(&mut Print)?;
    eprintln!("phase seconds: {:?}", agent.phase_times());
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
