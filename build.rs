//! Gives this package's tests and benches a run-time path to the MuJoCo
//! library: cargo passes a build script's link arguments only to the
//! package's own binaries, tests and benches, so each package that links
//! MuJoCo carries this same three-line script.
fn main() {
    println!("cargo::rerun-if-env-changed=MUJOCO_DYNAMIC_LINK_DIR");
    if std::env::var_os("CARGO_FEATURE_MUJOCO").is_some()
        && let Ok(dir) = std::env::var("MUJOCO_DYNAMIC_LINK_DIR")
    {
        println!("cargo::rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
