//! Compute backends. The CPU backend serves tests, CI and small models; every op the model needs
//! is a plain function over f32 slices so that a device backend can mirror it one to one.

pub mod cpu;
