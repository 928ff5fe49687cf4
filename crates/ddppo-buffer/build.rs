//! The benches drive MuJoCo through `ddppo-env` (a dev-dependency): give them
//! a run-time path to the library, as `ddppo-env`'s own build script does for
//! its tests, since cargo passes link arguments only to a package's own targets.
fn main() {
    println!("cargo::rerun-if-env-changed=MUJOCO_DYNAMIC_LINK_DIR");
    if let Ok(dir) = std::env::var("MUJOCO_DYNAMIC_LINK_DIR") {
        println!("cargo::rustc-link-arg-benches=-Wl,-rpath,{dir}");
    }
}
