//! A missing assets directory or XML is a one-line error that says what to
//! do. Its own test binary: it changes the process environment, which must
//! not race with other tests.
#![cfg(feature = "mujoco")]
use ddppo_env::{Error, Task, make};

#[test]
fn missing_assets_dir_and_missing_xml_point_to_xtask_setup() {
    let empty = std::env::temp_dir().join(format!("ddppo-env-no-assets-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let nowhere = empty.join("does-not-exist");
    // SAFETY: this binary's only test; no other thread reads the environment.
    unsafe { std::env::set_var("DDPPO_ASSETS_DIR", &nowhere) };
    let err = make(Task::Hopper).err().unwrap();
    assert!(matches!(&err, Error::AssetsMissing { path } if *path == nowhere), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("cargo xtask setup") && msg.contains("does-not-exist") && !msg.contains('\n'), "{msg}");

    // The directory exists but lacks the task's XML.
    unsafe { std::env::set_var("DDPPO_ASSETS_DIR", &empty) };
    let err = make(Task::Ant).err().unwrap();
    assert!(matches!(&err, Error::AssetsMissing { path } if *path == empty.join("ant.xml")), "{err}");

    // A file that is not a MuJoCo model.
    std::fs::write(empty.join("humanoid.xml"), "<mujoco><worldbody><bogus/></worldbody></mujoco>").unwrap();
    let err = make(Task::Humanoid).err().unwrap();
    assert!(matches!(&err, Error::ModelLoad { .. }), "{err}");
    assert!(!err.to_string().contains('\n'), "{err}");
    std::fs::remove_dir_all(&empty).unwrap();
}
