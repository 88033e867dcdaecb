//! Interleaving: comparisons made so that a machine whose speed drifts during a run
//! (20-40% from one burst to the next on a shared host) favours neither side. Each
//! round runs every compared side once, in an order that alternates by round, and sides
//! are compared round by round.

/// The order in which round `round` runs `n` compared sides: forward in even rounds,
/// reversed in odd ones, so that over the rounds no side always goes first or always
/// follows another.
pub fn round_order(n: usize, round: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// `a / b` for each round in which both sides ran.
pub fn ratios_by_round(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| a / b).collect()
}
