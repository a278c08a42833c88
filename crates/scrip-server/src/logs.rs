//! Log lines that anyone can cause, limited per second
//! ([`scrip_vital::LogBudget`], shared with the proxy).

pub(crate) use scrip_vital::LogBudget as Budget;
