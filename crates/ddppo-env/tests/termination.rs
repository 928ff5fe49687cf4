//! The termination table of ALGORITHM.md section 8, case by case.
use ddppo_env::{Task, is_terminal};

fn row(task: Task, head: &[f32]) -> Vec<f32> {
    let mut s = vec![0.0; task.obs_dim()];
    s[..head.len()].copy_from_slice(head);
    s
}

#[test]
fn hopper() {
    let t = Task::Hopper;
    assert!(!is_terminal(t, &row(t, &[1.25, 0.0])));
    assert!(is_terminal(t, &row(t, &[0.7, 0.0])), "height must exceed 0.7");
    assert!(is_terminal(t, &row(t, &[1.25, 0.2])), "|angle| must be below 0.2");
    assert!(is_terminal(t, &row(t, &[1.25, -0.2])));
    let mut s = row(t, &[1.25, 0.0]);
    s[10] = 100.0;
    assert!(is_terminal(t, &s), "|s[1:]| must be below 100");
    s[10] = f32::NAN;
    assert!(is_terminal(t, &s));
}

#[test]
fn walker2d() {
    let t = Task::Walker2d;
    assert!(!is_terminal(t, &row(t, &[1.25, 0.0])));
    assert!(!is_terminal(t, &row(t, &[1.25, 0.99])));
    assert!(is_terminal(t, &row(t, &[0.8, 0.0])));
    assert!(is_terminal(t, &row(t, &[2.0, 0.0])));
    assert!(is_terminal(t, &row(t, &[1.25, -1.0])));
    assert!(is_terminal(t, &row(t, &[f32::NAN, 0.0])));
}

#[test]
fn ant() {
    let t = Task::Ant;
    assert!(!is_terminal(t, &row(t, &[0.2])), "the bounds are inclusive");
    assert!(!is_terminal(t, &row(t, &[1.0])));
    assert!(is_terminal(t, &row(t, &[0.19])));
    assert!(is_terminal(t, &row(t, &[1.01])));
    let mut s = row(t, &[0.5]);
    s[26] = f32::INFINITY;
    assert!(is_terminal(t, &s));
}

#[test]
fn humanoid() {
    let t = Task::Humanoid;
    assert!(!is_terminal(t, &row(t, &[1.0])));
    assert!(!is_terminal(t, &row(t, &[2.0])));
    assert!(is_terminal(t, &row(t, &[0.99])));
    assert!(is_terminal(t, &row(t, &[2.01])));
}

#[test]
fn inverted_pendulum() {
    let t = Task::InvertedPendulum;
    assert!(!is_terminal(t, &row(t, &[5.0, 0.2])));
    assert!(is_terminal(t, &row(t, &[0.0, 0.21])));
    assert!(is_terminal(t, &row(t, &[0.0, -0.21])));
    assert!(is_terminal(t, &row(t, &[f32::NAN, 0.0])));
}

#[test]
fn never_terminating_tasks() {
    for t in [Task::HalfCheetah, Task::Pendulum, Task::Linear] {
        assert!(!is_terminal(t, &row(t, &[-100.0, 100.0])), "{t}");
    }
}

#[test]
fn short_rows_count_as_terminal() {
    assert!(is_terminal(Task::Hopper, &[1.0]));
    assert!(is_terminal(Task::Ant, &[]));
}
