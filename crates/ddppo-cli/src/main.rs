//! The `ddppo` command-line tool.
fn main() {
    println!("ddppo {}", env!("CARGO_PKG_VERSION"));
}
