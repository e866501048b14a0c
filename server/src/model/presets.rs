//! Named model shapes for `--load-format dummy`: random weights of a well-known model from its
//! name alone, with no files (benchmarks, load tests, capacity planning).
//!
//! Each preset is the model's HF `config.json`, trimmed to what [`ModelConfig`] reads, so it
//! goes through the same parser as a real checkpoint.

use super::ModelConfig;

/// A named shape.
pub struct Preset {
    /// The name it is served under (the HF repository name without its owner).
    pub name: &'static str,
    config_json: &'static str,
}

impl Preset {
    /// The preset's configuration.
    pub fn config(&self) -> ModelConfig {
        ModelConfig::from_hf_json(self.config_json)
            .unwrap_or_else(|e| panic!("preset {}: invalid built-in config: {e}", self.name))
    }
}

/// Llama 3.1 / 3.2 share their vocabulary, RoPE base and llama3 scaling; the instruct models'
/// end-of-turn ids are the eos ids.
macro_rules! llama3 {
    ($hidden:literal, $inter:literal, $layers:literal, $heads:literal, $head_dim:literal, $factor:literal, $tie:literal) => {
        concat!(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":128256,"hidden_size":"#,
            $hidden,
            r#","intermediate_size":"#,
            $inter,
            r#","num_hidden_layers":"#,
            $layers,
            r#","num_attention_heads":"#,
            $heads,
            r#","num_key_value_heads":8,"head_dim":"#,
            $head_dim,
            r#","max_position_embeddings":131072,"rope_theta":500000.0,"rms_norm_eps":1e-5,"tie_word_embeddings":"#,
            $tie,
            r#","rope_scaling":{"factor":"#,
            $factor,
            r#","low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192,"rope_type":"llama3"},"bos_token_id":128000,"eos_token_id":[128001,128008,128009]}"#
        )
    };
}

/// The presets, smallest first.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "SmolLM2-135M",
        config_json: r#"{"architectures":["LlamaForCausalLM"],"vocab_size":49152,"hidden_size":576,
            "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
            "max_position_embeddings":8192,"rope_theta":100000.0,"rms_norm_eps":1e-5,"tie_word_embeddings":true,
            "bos_token_id":1,"eos_token_id":2}"#,
    },
    Preset {
        name: "Llama-3.2-1B",
        config_json: llama3!(2048, 8192, 16, 32, 64, 32.0, true),
    },
    Preset {
        name: "Llama-3.2-3B",
        config_json: llama3!(3072, 8192, 28, 24, 128, 32.0, true),
    },
    Preset {
        name: "Llama-3.1-8B",
        config_json: llama3!(4096, 14336, 32, 32, 128, 8.0, false),
    },
    Preset {
        name: "Llama-3.1-70B",
        config_json: llama3!(8192, 28672, 80, 64, 128, 8.0, false),
    },
];

/// The preset `name` names. Case does not matter, nor an owner prefix (`meta-llama/`), a
/// `Meta-` prefix or an `-Instruct` suffix: instruct models have their base model's shape.
pub fn find(name: &str) -> Option<&'static Preset> {
    let key = normalize(name);
    PRESETS.iter().find(|p| normalize(p.name) == key)
}

/// The presets' names, for messages.
pub fn names() -> String {
    PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
}

fn normalize(name: &str) -> String {
    let base = name
        .trim()
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let lower = base.to_ascii_lowercase();
    let lower = lower.strip_prefix("meta-").unwrap_or(&lower);
    lower.strip_suffix("-instruct").unwrap_or(lower).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every preset has its model's published parameter count, to the parameter.
    #[test]
    fn every_preset_has_the_published_parameter_count() {
        let published = [
            ("SmolLM2-135M", 134_515_008),
            ("Llama-3.2-1B", 1_235_814_400),
            ("Llama-3.2-3B", 3_212_749_824),
            ("Llama-3.1-8B", 8_030_261_248),
            ("Llama-3.1-70B", 70_553_706_496),
        ];
        assert_eq!(published.len(), PRESETS.len());
        for (name, count) in published {
            let c = find(name).unwrap().config();
            assert_eq!(c.num_parameters(), count, "{name}");
            assert_eq!(c.num_heads % c.num_kv_heads, 0, "{name}");
            assert!(!c.eos_token_ids.is_empty(), "{name}");
        }
        let c = find("Llama-3.1-8B").unwrap().config();
        let r = c.rope_scaling.as_ref().unwrap();
        assert_eq!((r.factor, r.original_max_position_embeddings), (8.0, 8192));
        assert_eq!(c.rope_theta, 500000.0);
    }

    #[test]
    fn names_match_with_owner_case_and_instruct_variants() {
        for name in [
            "Llama-3.1-8B",
            "llama-3.1-8b",
            "meta-llama/Llama-3.1-8B-Instruct",
            "meta-llama/Meta-Llama-3.1-8B-Instruct",
            "Meta-Llama-3.1-8B/",
        ] {
            assert_eq!(find(name).map(|p| p.name), Some("Llama-3.1-8B"), "{name}");
        }
        assert_eq!(
            find("HuggingFaceTB/SmolLM2-135M-Instruct").map(|p| p.name),
            Some("SmolLM2-135M")
        );
        for name in ["Llama-3.1-9B", "", "/", "models/x"] {
            assert!(find(name).is_none(), "{name}");
        }
        assert!(names().contains("Llama-3.1-70B"));
    }
}
