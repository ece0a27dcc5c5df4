"""The DDPO paper's prompt-image alignment reward: LLaVA describes the image, BERTScore recall
scores the description against "The image contains {prompt}".

As the paper's code does (ddpo-pytorch `llava_bertscore` and the kvablack/LLaVA-server it
calls): LLaVA is asked "Answer concisely: what is going on in this image?" and answers greedily
(64 new tokens at most); BERTScore uses `microsoft/deberta-xlarge-mnli` at layer 40 (the
bert-score package's setting for that model), no idf weighting, no baseline rescaling, and the
reward is the recall:

    R = mean over reference tokens r (special tokens excluded) of max over answer tokens a
        (special tokens included, as bert-score does) of cos(h_r, h_a),

h the model's hidden states at that layer. The layer is chosen from the model's config
(model_type, number of layers), so a local copy of deberta-xlarge-mnli is read at 40 as the hub
one is; `bertscore_layer` names another. (bert-score zeroes padding similarities instead of
excluding them; they differ only when every similarity is negative.) BERTScore is computed here
with transformers directly: no `bert-score` package needed.

Not as the paper's code: the captioner and so its prompt. The paper's server ran LLaVA v0 (13B,
in LLaVA's own code) and wrapped the question in LLaVA v0's `simple_conv_multimodal`
conversation (`DDPO_V0_PROMPT`: "You are LLaVA, ...###Human: Hi!###Assistant: Hi there! ...
###Human: <image> {question}###"), keeping the text after "Assistant:" up to the first "#".
Those weights do not load into transformers' Llava as they are (v0 has a one-layer projector
and ships as LLaMA-1 deltas), so the default captioner is `llava-hf/llava-1.5-7b-hf`, asked with
its own chat template (`template="chat"`): LLaVA-1.5's "USER: <image>\\n{question} ASSISTANT:",
the format LLaVA-1.5 was trained on, which the v0 conversation is not. `template="ddpo"` sends
the server's v0 conversation text instead, for a LLaVA trained on that format (a v0 model
converted to transformers' Llava); its token-level quirks (the question tokenised apart, so a
BOS token in mid-sequence) are not reproduced.

LLaVA: through transformers; 4-bit (bitsandbytes NF4) on a CUDA device where bitsandbytes is
installed, else fp16 on a GPU and fp32 on the CPU. A 4-bit model cannot be moved, so `offload`
applies to the BERTScore model only when LLaVA is 4-bit. The ddpo-pytorch client sent JPEG
(quality 80) copies of the images; this reward reads the images as given.

To keep it off the training GPU, serve it: `ddpo-lite serve-reward prompt_alignment`.
"""

from __future__ import annotations

import importlib.util

from ddpo_lite.rewards import _models
from ddpo_lite.rewards.registry import register_reward

DEFAULT_CAPTIONER = "llava-hf/llava-1.5-7b-hf"
DEFAULT_BERTSCORE = "microsoft/deberta-xlarge-mnli"
QUESTION = "Answer concisely: what is going on in this image?"
REFERENCE = "The image contains {prompt}"
# kvablack/LLaVA-server: LLaVA v0's `simple_conv_multimodal.get_prompt() + "Human: "` (its
# system sentences joined without spaces, as there), the image, " ", the question, "###".
DDPO_V0_PROMPT = (
    "You are LLaVA, a large language and vision assistant trained by UW Madison WAIV Lab."
    "You are able to understand the visual content that the user provides, and assist the user "
    "with a variety of tasks using natural language."
    "Follow the instructions carefully and explain your answers in detail."
    "###Human: Hi!###Assistant: Hi there!  How can I help you today?\n###Human: "
    "{image} {question}###"
)
TEMPLATES = ("chat", "ddpo")

# bert-score's tuned layer (bert_score.utils.model2layers, bert-score 0.3.13) for the DeBERTa MNLI
# models, keyed by what their configs say rather than by hub name, so that a local folder of one
# gets its layer too: (model_type, num_hidden_layers) -> layer. (bert-score reads the plain,
# non-MNLI deberta-large and -xlarge, of the same shapes, at 16 and 18: pass bertscore_layer.)
BERTSCORE_LAYERS = {
    ("deberta", 48): 40,  # microsoft/deberta-xlarge-mnli, the default
    ("deberta", 24): 18,  # microsoft/deberta-large-mnli
    ("deberta", 12): 9,  # microsoft/deberta-base-mnli (and deberta-base)
}
# and by hub name, as bert-score looks them up, for the other models it names that we list
BERTSCORE_LAYERS_BY_NAME = {
    "microsoft/deberta-large": 16,
    "microsoft/deberta-xlarge": 18,
    "roberta-large": 17,  # bert-score's default English model
    "FacebookAI/roberta-large": 17,
    "roberta-large-mnli": 19,
    "FacebookAI/roberta-large-mnli": 19,
    "bert-base-uncased": 9,
    "google-bert/bert-base-uncased": 9,
}


def bertscore_layer_for(config, source: str) -> int:
    """bert-score's layer for the model `source` with `config`: by hub name where bert-score's
    table names it, else by the config's (model_type, num_hidden_layers)."""
    if source in BERTSCORE_LAYERS_BY_NAME:
        return BERTSCORE_LAYERS_BY_NAME[source]
    key = (config.model_type, config.num_hidden_layers)
    if key not in BERTSCORE_LAYERS:
        raise ValueError(
            f"no BERTScore layer is known for {source!r} (model_type {key[0]!r}, {key[1]} "
            "layers); pass bertscore_layer (bert-score's model2layers table has the tuned layer "
            "for many models)"
        )
    return BERTSCORE_LAYERS[key]


def bertscore_recall(model, tokenizer, candidates, references, layer: int, device):
    """BERTScore recall of each candidate against its reference -> (b,) tensor."""
    import torch

    def embed(texts):
        tokens = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(device) for k, v in tokens.items()}
        hidden = model(**tokens, output_hidden_states=True).hidden_states[layer]  # (b, T, H)
        hidden = hidden.float() / hidden.float().norm(dim=-1, keepdim=True)
        special = [
            tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
            for ids in tokens["input_ids"].tolist()
        ]
        special = torch.tensor(special, device=device)  # (b, T): 1 at [CLS], [SEP], padding
        return hidden, tokens["attention_mask"].bool(), special.bool()

    cand, cand_mask, _ = embed(candidates)
    ref, ref_mask, ref_special = embed(references)
    sim = torch.einsum("brh,bch->brc", ref, cand)  # (b, T_ref, T_cand)
    sim = sim.masked_fill(~cand_mask[:, None, :], float("-inf"))
    best = sim.max(dim=-1).values  # (b, T_ref): each reference token's closest answer token
    weight = (ref_mask & ~ref_special).float()
    return (best.nan_to_num(0.0) * weight).sum(-1) / weight.sum(-1).clamp(min=1)


def load_bertscore(source: str, layer: int | None):
    from transformers import AutoModel, AutoTokenizer

    model = _models.from_pretrained(AutoModel, source)
    tokenizer = _models.from_pretrained(AutoTokenizer, source)
    layers = model.config.num_hidden_layers
    if layer is None:
        layer = bertscore_layer_for(model.config, source)
    if not 0 < layer <= layers:
        raise ValueError(f"bertscore_layer {layer} is outside 1..{layers} for {source!r}")
    return model, tokenizer, layer


def load_captioner(source: str, device: str, quantize: str | None):
    """LLaVA and its processor; `quantize` "4bit", None, or "auto" (4-bit where it can run)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    can_4bit = str(device).startswith("cuda") and importlib.util.find_spec("bitsandbytes")
    if quantize == "auto":
        quantize = "4bit" if can_4bit else None
    kwargs = {}
    if quantize == "4bit":
        if not can_4bit:
            raise ValueError("quantize='4bit' needs a CUDA device and bitsandbytes installed")
        import torch
        from transformers import BitsAndBytesConfig

        kwargs = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.float16,
            ),
            "device_map": {"": device},
        }
    elif quantize is not None:
        raise ValueError(f"quantize must be '4bit', 'auto' or None, got {quantize!r}")
    model = _models.from_pretrained(LlavaForConditionalGeneration, source, **kwargs)
    processor = _models.from_pretrained(AutoProcessor, source)
    processor.image_processor = _models.pil_image_processor(source)  # not torchvision's
    processor.tokenizer.padding_side = "left"  # batched generation continues from the right
    return model, processor, quantize == "4bit"


def describe(
    model, processor, images, question: str, max_new_tokens: int, device, dtype, template="chat"
):
    """LLaVA's greedy answer to `question` about each image -> list of str. `template`: "chat"
    (the model's chat template) or "ddpo" (the DDPO server's LLaVA v0 conversation)."""
    if template == "chat":
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    else:
        image_token = getattr(processor, "image_token", "<image>")
        text = DDPO_V0_PROMPT.format(image=image_token, question=question)
    inputs = processor(
        images=[image.convert("RGB") for image in images],
        text=[text] * len(images),
        padding=True,
        return_tensors="pt",
    ).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answers = processor.batch_decode(
        output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    if template == "ddpo":
        answers = [ddpo_v0_answer(answer) for answer in answers]
    return [answer.strip() for answer in answers]


def ddpo_v0_answer(output: str) -> str:
    """The LLaVA server's cleaning of a v0 answer: up to the first "#" (it stopped generating
    at "###", "##" or "#"), then what follows the first "Assistant:", if any."""
    output = output.split("#")[0]
    if "Assistant:" in output:
        output = output.split("Assistant:")[1]
    return output.strip()


@register_reward(
    "prompt_alignment", "LLaVA describes the image; BERTScore recall vs 'The image contains ...'"
)
def prompt_alignment(
    device: str = "cpu",
    model: str | None = None,
    offload: bool = False,
    bertscore_model: str | None = None,
    bertscore_layer: int | None = None,
    quantize: str | None = "auto",
    question: str = QUESTION,
    reference: str = REFERENCE,
    template: str = "chat",
    max_new_tokens: int = 64,
    batch_size: int = 8,
    dtype: str | None = None,
):
    """`model`: the LLaVA (hub id or folder); `bertscore_model`/`bertscore_layer`: the BERTScore
    encoder and the hidden layer it is read at (default: deberta-xlarge-mnli, 40; the layer is
    bert-score's for the model's config); `template`: "chat" (the LLaVA's own chat template:
    LLaVA-1.5's for the default model) or "ddpo" (the DDPO server's LLaVA v0 conversation)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {list(TEMPLATES)}")
    captioner, processor, quantized = load_captioner(model or DEFAULT_CAPTIONER, device, quantize)
    scorer, tokenizer, layer = load_bertscore(bertscore_model or DEFAULT_BERTSCORE, bertscore_layer)
    torch_dtype = _models.resolve_dtype(device, dtype)
    if quantized:
        captioner.eval()
        captioner.requires_grad_(False)

    def score(images, prompts, metadata):
        answers = describe(
            captioner, processor, images, question, max_new_tokens, device, torch_dtype, template
        )
        references = [reference.format(prompt=prompt) for prompt in prompts]
        recall = bertscore_recall(scorer, tokenizer, answers, references, layer, device)
        return recall, {"answer": answers}

    movable = [scorer] if quantized else [captioner, scorer]
    return _models.BatchedReward(
        "prompt_alignment", score, movable, device, torch_dtype, offload, batch_size
    )
