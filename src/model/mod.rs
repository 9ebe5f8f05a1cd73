//! The model layer: particles and the programs that act on them, and the Feynman-Kac model
//! (kernel steps through a proposal, weighted by a potential) written as a program.

pub mod feynman_kac;
pub mod particle;
pub mod program;
