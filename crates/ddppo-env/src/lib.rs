//! MuJoCo tasks with MuJoCo-v2 semantics and analytic envs with exact Jacobians (paper section 5; ALGORITHM.md section 8).
