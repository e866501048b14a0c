//! `loraplane-operator`: the Kubernetes controller for `LoraAdapter` resources.
//!
//! The controller is not built yet; until it is, the binary says so and exits with an error
//! rather than pretending to reconcile anything.

fn main() {
    eprintln!("loraplane-operator: the LoraAdapter controller is not implemented yet");
    std::process::exit(2);
}
