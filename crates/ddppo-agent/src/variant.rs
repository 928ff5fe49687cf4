//! The algorithms of ALGORITHM.md section 6 as one table: each [`Variant`]
//! names its rollout model, where the policy update's derivatives come from,
//! how the policy is updated and whether the gradient loss is trained. Code
//! that behaves differently per variant asks [`Variant::spec`] instead of
//! matching on the variant, so a new variant is one row here.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The algorithms of ALGORITHM.md section 6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// Prediction ensemble rolls out, gradient ensemble (with `w R`) differentiates.
    Ddppo,
    /// Prediction ensemble for both value and derivative; no gradient loss.
    NoGradLoss,
    /// One ensemble trained with the gradient loss, for both.
    SingleModel,
    /// One ensemble with about twice the parameters (wider layers), no gradient loss.
    DoubleParams,
    /// MBPO: model rollouts for the critic, SAC policy loss on the mixed batch.
    Mbpo,
    /// Model-free SAC.
    Sac,
}

/// The ensemble that produces rollouts (the values of model steps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutModel {
    /// No learned model (model-free).
    None,
    /// An ensemble of `model.hidden` width trained by the Gaussian NLL.
    Prediction,
    /// As `Prediction` with the width of about twice the parameters
    /// ([`crate::AgentConfig::double_params_width`]).
    Wide,
    /// An ensemble of `model.hidden` width trained by NLL plus `w R` (equation 10).
    WithGradientLoss,
}

/// Where the policy update's model derivatives `d(r, s')/d(s, a)` come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradientSource {
    /// A second ensemble, trained with the gradient loss, differentiated at
    /// members drawn separately from the rollout's.
    SeparateEnsemble,
    /// The mean of the rollout ensemble's member that produced the value.
    RolloutMean,
    /// The policy update does not differentiate a model.
    None,
}

/// How the policy is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyUpdate {
    /// Equation 11, back-propagated through `H` model steps (section 4).
    ThroughModel,
    /// SAC's loss `alpha log pi - min Q` on a critic-style batch.
    Sac,
}

/// What a variant is made of (one row of the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VariantSpec {
    /// The ensemble that rolls out.
    pub rollout_model: RolloutModel,
    /// Where the policy update's derivatives come from.
    pub gradient_source: GradientSource,
    /// How the policy is updated.
    pub policy_update: PolicyUpdate,
    /// Whether some ensemble is trained with the directional-derivative loss
    /// (its `[gradient]` settings are then validated and used).
    pub gradient_loss: bool,
}

impl VariantSpec {
    /// Whether a dynamics model is learned at all (and `D_model` filled).
    pub fn uses_model(&self) -> bool {
        self.rollout_model != RolloutModel::None
    }
}

const fn row(
    rollout_model: RolloutModel,
    gradient_source: GradientSource,
    policy_update: PolicyUpdate,
    gradient_loss: bool,
) -> VariantSpec {
    VariantSpec { rollout_model, gradient_source, policy_update, gradient_loss }
}

/// The table, in the order of section 6 (the order `ddppo variant list` prints).
const TABLE: [(Variant, &str, VariantSpec); 6] = {
    use GradientSource as G;
    use PolicyUpdate as P;
    use RolloutModel as R;
    [
        (Variant::Ddppo, "ddppo", row(R::Prediction, G::SeparateEnsemble, P::ThroughModel, true)),
        (Variant::NoGradLoss, "no-grad-loss", row(R::Prediction, G::RolloutMean, P::ThroughModel, false)),
        (Variant::SingleModel, "single-model", row(R::WithGradientLoss, G::RolloutMean, P::ThroughModel, true)),
        (Variant::DoubleParams, "double-params", row(R::Wide, G::RolloutMean, P::ThroughModel, false)),
        (Variant::Mbpo, "mbpo", row(R::Prediction, G::None, P::Sac, false)),
        (Variant::Sac, "sac", row(R::None, G::None, P::Sac, false)),
    ]
};

impl Variant {
    /// All variants, in the order of section 6.
    pub const ALL: [Variant; 6] = {
        let mut all = [Variant::Ddppo; 6];
        let mut i = 0;
        while i < TABLE.len() {
            all[i] = TABLE[i].0;
            i += 1;
        }
        all
    };

    fn entry(self) -> &'static (Variant, &'static str, VariantSpec) {
        // Every variant has its row: `table_is_complete` below.
        &TABLE[self as usize]
    }

    /// The variant's row of the table.
    pub fn spec(self) -> VariantSpec {
        self.entry().2
    }

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        self.entry().1
    }

    /// Parses a variant name; the error lists the valid ones.
    pub fn from_name(name: &str) -> Result<Self> {
        TABLE.iter().find(|(_, n, _)| *n == name).map(|(v, _, _)| *v).ok_or_else(|| {
            let names: Vec<&str> = TABLE.iter().map(|(_, n, _)| *n).collect();
            Error::Config(format!("unknown variant `{name}`; valid: {}", names.join(", ")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_complete() {
        // `entry` indexes the table by discriminant: row i must hold variant i.
        for (i, (v, name, _)) in TABLE.iter().enumerate() {
            assert_eq!(*v as usize, i, "row {i} holds {name}");
            assert_eq!(serde_json::to_string(v).unwrap(), format!("\"{name}\""), "serde name of {name}");
        }
    }

    #[test]
    fn rows_are_consistent() {
        for v in Variant::ALL {
            let s = v.spec();
            // Differentiating through a model needs one; a separate gradient
            // ensemble is one trained with the gradient loss.
            assert_eq!(s.policy_update == PolicyUpdate::ThroughModel, s.gradient_source != GradientSource::None);
            if s.gradient_source != GradientSource::None {
                assert!(s.uses_model(), "{}", v.name());
            }
            if s.gradient_source == GradientSource::SeparateEnsemble {
                assert!(s.gradient_loss, "{}", v.name());
            }
            assert!(s.rollout_model != RolloutModel::WithGradientLoss || s.gradient_loss, "{}", v.name());
        }
        assert_eq!(Variant::ALL.iter().filter(|v| v.spec().gradient_loss).count(), 2);
    }
}
