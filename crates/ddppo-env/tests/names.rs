//! Task names: round trip, and the unknown-name error lists the valid ones.
use ddppo_env::{Error, Task};

#[test]
fn names_round_trip() {
    for task in Task::ALL {
        assert_eq!(Task::from_name(task.name()).unwrap(), task);
        assert_eq!(task.name().parse::<Task>().unwrap(), task);
    }
    assert_eq!(Task::ALL.iter().filter(|t| t.is_mujoco()).count(), 6);
}

#[test]
fn unknown_name_lists_the_valid_names() {
    let err = Task::from_name("HalfCheetah-v2").unwrap_err();
    assert!(matches!(err, Error::UnknownTask { .. }));
    assert_eq!(
        err.to_string(),
        "unknown env `HalfCheetah-v2`; valid names: inverted-pendulum, hopper, walker2d, half-cheetah, ant, humanoid, pendulum, linear"
    );
}

#[cfg(not(feature = "mujoco"))]
#[test]
fn mujoco_tasks_need_the_feature() {
    let err = ddppo_env::make(Task::Ant).err().unwrap();
    assert_eq!(err.to_string(), "ant needs MuJoCo, but ddppo-env was built without its `mujoco` feature");
    assert!(ddppo_env::make(Task::Pendulum).is_ok());
}
