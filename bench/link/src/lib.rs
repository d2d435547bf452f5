//! Benchmarks of the origin link: a seeded impairment model ([`impair`]), a UDP proxy that
//! applies it ([`proxy`]), and a latency measurement over the real origin and subscriber
//! ([`latency`]).

pub mod impair;
pub mod latency;
pub mod proxy;
