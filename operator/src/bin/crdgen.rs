//! `crdgen`: prints the `LoraAdapter` CustomResourceDefinition as YAML (see
//! `scripts/gen-crds.sh`).

use kube::CustomResourceExt;
use loraplane_operator::LoraAdapter;

fn main() {
    let crd = LoraAdapter::crd();
    match serde_saphyr::to_string(&crd) {
        Ok(yaml) => print!("{yaml}"),
        Err(e) => {
            eprintln!("crdgen: cannot render the CRD as YAML: {e}");
            std::process::exit(1);
        }
    }
}
