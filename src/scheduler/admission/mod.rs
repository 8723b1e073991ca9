//! Admission plugins: run for every request once declared under `plugins:` (no profile entry),
//! before scheduling. Guards run before budgets, so a rejected prompt costs nothing.

pub mod prompt_guard;
pub mod token_budget;

pub use prompt_guard::{GuardOutcome, PromptGuard};
pub use token_budget::{Admitted, BudgetDecision, Rejection, TokenBudget};
