"""
The Teaching Assistant network (MetaNet) and the frozen encoders that give it one feature vector per
(question, rationale).

MetaNet, for one question with perspectives k = 1..K:
    h_k = MLP(e_k) + p_k                      feature alignment (+ a learned embedding of perspective k)
    h   = LayerNorm(h + MHSA(h))              synergy layer: the perspectives look at each other
    s_k = mean_m S_{k,m},  S_{k,m} = head_m(h_k)   M independent scoring heads, averaged to damp spikes
"""
import torch
import torch.nn as nn
from tqdm import tqdm


class MetaNet(nn.Module):
    def __init__(self, feature_dim: int, num_perspectives: int = 8, hidden: int = 256, heads: int = 4,
                 score_heads: int = 4, attention: bool = True, dropout: float = 0.1):
        super().__init__()
        # e_k -> h_k. The input LayerNorm puts features from any encoder (a 128-wide toy student or a
        # 4096-wide LLM) on one scale before the MLP, so one learning rate serves all.
        self.align = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.GELU(),
                                   nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.perspective = nn.Embedding(num_perspectives, hidden)  # p_k
        self.attention = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True) if attention else None
        self.norm = nn.LayerNorm(hidden) if attention else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
                                   for _ in range(score_heads))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features[B,K,d], mask[B,K] (True = present) -> scores s[B,K]; 0 where absent."""
        h = self.align(features) + self.perspective.weight  # h_k = MLP(e_k) + p_k
        if self.attention is not None:
            # absent perspectives are neither attended to nor allowed to change the others
            a, _ = self.attention(h, h, h, key_padding_mask=~mask, need_weights=False)
            h = self.norm(h + self.drop(a))
        S = torch.cat([head(h) for head in self.heads], dim=-1)  # S ∈ R^{K×M} per question
        return S.mean(-1).masked_fill(~mask, 0.0)  # s_k = mean_m S_{k,m}


# -----------------------------------------------------------------------------
# Feature encoders e_k (frozen; computed once and cached by train.py)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden[N,T,H] over the positions where mask[N,T] is true; padding never counts. -> [N,H]"""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


@torch.no_grad()
def encode_student(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32, layer: int = -1,
                   progress: bool = True, max_len: int | None = None) -> torch.Tensor:
    """e = mean-pooled hidden state (hidden_states[layer]) of a causal LM over each rationale's tokens,
    for (question, rationale) pairs put in the student's chat format. -> [N, hidden]"""
    from eval import collate, encode_example  # the chat format is owned by eval.py
    device = next(model.parameters()).device
    enc = [encode_example(tokenizer, q, r, max_len=max_len) for q, r in pairs]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
    out = [None] * len(enc)
    for s in tqdm(range(0, len(order), batch_size), desc="encode", disable=not progress, leave=False):
        idx = order[s:s + batch_size]
        batch = collate([enc[i] for i in idx], tokenizer)
        hs = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   output_hidden_states=True).hidden_states[layer]
        pooled = mean_pool(hs.float(), batch["completion_mask"].to(device)).cpu()
        for r, i in enumerate(idx):
            out[i] = pooled[r]
    return torch.stack(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def encode_sentences(name_or_path: str, texts: list[str], batch_size: int = 32, progress: bool = True,
                     device: str = "cpu", max_len: int = 256) -> torch.Tensor:
    """e = attention-mask mean pooling of a BERT-style sentence encoder (the paper's choice, e.g.
    sentence-transformers/all-MiniLM-L6-v2) through transformers.AutoModel. -> [N, d]"""
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModel.from_pretrained(name_or_path).to(device).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    for s in tqdm(range(0, len(order), batch_size), desc="encode", disable=not progress, leave=False):
        idx = order[s:s + batch_size]
        batch = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        pooled = mean_pool(model(**batch).last_hidden_state.float(), batch["attention_mask"]).cpu()
        for r, i in enumerate(idx):
            out[i] = pooled[r]
    return torch.stack(out) if out else torch.zeros(0, 0)
