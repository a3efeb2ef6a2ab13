"""The tiny transformers LLaVA-OneVision (Qwen3 + SigLIP) that the VLM parity tests build: one definition."""
TILE = 56  # tile side of the tiny tower: 4 x 4 patches of 14 px


def text_config(vocab_size, **overrides):
    """Qwen3 text config: hidden 64, 2 layers, 4 q / 2 kv heads of 16, tied embeddings."""
    return dict(model_type="qwen3", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                tie_word_embeddings=True, **overrides)


VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, image_size=TILE, patch_size=14, vision_use_head=False)


def llava_onevision_config(text, image_token_index):
    """transformers LlavaOnevisionConfig over `text` and VISION: last vision layer, all patches, AnyRes grid
    pinpoints 56*(1..6) per side. transformers needs an in-vocab image token; ours is the -200 sentinel."""
    import transformers
    return transformers.LlavaOnevisionConfig(
        text_config=text, vision_config=VISION, image_token_index=image_token_index, vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=True,
        image_grid_pinpoints=[[TILE * i, TILE * j] for i in range(1, 7) for j in range(1, 7)])
