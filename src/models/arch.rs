//! The model architectures the linked llama.cpp loads: the names of `LLM_ARCH_NAMES` in
//! llama-cpp-sys-2 0.1.160's `llama.cpp/src/llama-arch.cpp`, without `clip` (only used by
//! llama-quantize) and `(unknown)`. The test below re-reads that file from cargo's copy of the
//! crate, so a version bump that adds architectures fails until this list follows.

/// Sorted, so a lookup is a binary search.
const ARCHITECTURES: &[&str] = &[
    "afmoe",
    "apertus",
    "arcee",
    "arctic",
    "arwkv7",
    "baichuan",
    "bailingmoe",
    "bailingmoe2",
    "bailingmoe3",
    "bert",
    "bitnet",
    "bloom",
    "chameleon",
    "chatglm",
    "clef",
    "codeshell",
    "cogvlm",
    "cohere2",
    "cohere2moe",
    "command-r",
    "dbrx",
    "deci",
    "deepseek",
    "deepseek2",
    "deepseek2-ocr",
    "deepseek32",
    "deepseek4",
    "dflash",
    "dots1",
    "dots3note",
    "dream",
    "eagle3",
    "ernie4_5",
    "ernie4_5-moe",
    "eurobert",
    "exaone",
    "exaone-moe",
    "exaone4",
    "falcon",
    "falcon-h1",
    "gemma",
    "gemma-embedding",
    "gemma2",
    "gemma3",
    "gemma3n",
    "gemma4",
    "gemma4-assistant",
    "glm-dsa",
    "glm4",
    "glm4moe",
    "glm5-next",
    "gpt-oss",
    "gpt2",
    "gptj",
    "gptneox",
    "granite",
    "granite_swa",
    "granitehybrid",
    "granitemoe",
    "graniteswitch",
    "grok",
    "grovemoe",
    "hrm_text",
    "hunyuan-dense",
    "hunyuan-moe",
    "hunyuan_vl",
    "hy_v3",
    "hy_v4",
    "internlm2",
    "jais",
    "jais2",
    "jamba",
    "jina-bert-v2",
    "jina-bert-v3",
    "kimi-k3",
    "kimi-linear",
    "laguna",
    "lfm2",
    "lfm2moe",
    "llada",
    "llada-moe",
    "llama",
    "llama-embed",
    "llama4",
    "maincoder",
    "mamba",
    "mamba2",
    "maple",
    "mellum",
    "mimo2",
    "minicpm",
    "minicpm3",
    "minimax-01",
    "minimax-m2",
    "minimax-m3",
    "mistral3",
    "mistral4",
    "modern-bert",
    "mpt",
    "muse-glimmer",
    "nanbeige",
    "nemotron",
    "nemotron_h",
    "nemotron_h_moe",
    "neo-bert",
    "nomic-bert",
    "nomic-bert-moe",
    "olmo",
    "olmo2",
    "olmoe",
    "openelm",
    "orion",
    "paddleocr",
    "pangu-embedded",
    "phi2",
    "phi3",
    "phimoe",
    "plamo",
    "plamo2",
    "plamo3",
    "plm",
    "pockettts",
    "qwen",
    "qwen2",
    "qwen2moe",
    "qwen2vl",
    "qwen3",
    "qwen35",
    "qwen35moe",
    "qwen3moe",
    "qwen3next",
    "qwen3tts",
    "qwen3vl",
    "qwen3vlmoe",
    "qwen4exp",
    "refact",
    "rnd1",
    "rwkv6",
    "rwkv6qwen2",
    "rwkv7",
    "seed_oss",
    "smallthinker",
    "smollm3",
    "spark2_5",
    "stablelm",
    "starcoder",
    "starcoder2",
    "step35",
    "t5",
    "t5encoder",
    "talkie",
    "wavtokenizer-dec",
    "xverse",
];

pub fn supported(architecture: &str) -> bool {
    ARCHITECTURES.binary_search(&architecture).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_sorted_and_knows_common_architectures() {
        assert!(ARCHITECTURES.windows(2).all(|w| w[0] < w[1]));
        for arch in ["llama", "gemma3", "qwen2", "phi3", "mistral3"] {
            assert!(supported(arch), "{arch}");
        }
        assert!(!supported("clip") && !supported("not-an-arch"));
    }

    /// The list is what the pinned llama-cpp-sys-2 compiles: read its source where cargo
    /// unpacked it (`cargo metadata` would need every platform's crates downloaded).
    #[test]
    fn the_list_matches_the_linked_llama_cpp() {
        let home = std::env::var_os("CARGO_HOME")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| dirs::home_dir().unwrap().join(".cargo"));
        let wanted = format!("llama-cpp-sys-2-{}", crate::build::LLAMA_CPP_2);
        let crate_dir = std::fs::read_dir(home.join("registry/src"))
            .expect("cargo's registry sources")
            .flatten()
            .map(|index| index.path().join(&wanted))
            .find(|p| p.is_dir())
            .unwrap_or_else(|| panic!("{wanted} unpacked under {}", home.display()));
        let manifest = crate_dir.join("Cargo.toml");
        let source = std::fs::read_to_string(manifest.parent().unwrap().join("llama.cpp/src/llama-arch.cpp")).unwrap();
        let table = source.split("LLM_ARCH_NAMES = {").nth(1).unwrap().split("\n};").next().unwrap();
        let mut names: Vec<&str> =
            table.lines().filter_map(|l| l.split('"').nth(1)).filter(|n| *n != "clip" && *n != "(unknown)").collect();
        names.sort_unstable();
        assert_eq!(names, ARCHITECTURES);
    }
}
