"""Fake of backend/text_processing/t5_engine.py: Forge's T5 prompt engine.

It keeps ``text_encoder.transformer`` (the T5 module itself, not the ``IntegratedT5``), converts
``shared`` to fp32 on every encode, pads each BREAK-separated chunk to ``min_length`` and returns
``torch.stack`` of the per-chunk outputs.
"""

import torch
from modules.shared import opts

from backend import memory_management
from backend.text_processing import emphasis, parsing


class PromptChunk:
    def __init__(self):
        self.tokens = []
        self.multipliers = []


class T5TextProcessingEngine:
    def __init__(self, text_encoder, tokenizer, emphasis_name="Original", min_length=256):
        self.text_encoder = text_encoder.transformer
        self.tokenizer = tokenizer
        self.emphasis = emphasis.get_current_option(opts.emphasis)()
        self.min_length = min_length
        self.id_end = 1
        self.id_pad = 0
        self.comma_token = self.tokenizer.get_vocab().get(",</w>", None)
        self.token_mults = {}

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        device = memory_management.text_encoder_device()
        tokens = tokens.to(device)
        self.text_encoder.shared.to(device=device, dtype=torch.float32)
        return self.text_encoder(input_ids=tokens)

    def tokenize_line(self, line):
        parsed = parsing.parse_prompt_attention(line, self.emphasis.name)
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks = []
        chunk = PromptChunk()
        token_count = 0

        def next_chunk():
            nonlocal token_count, chunk
            chunk.tokens = [*chunk.tokens, self.id_end]
            chunk.multipliers = [*chunk.multipliers, 1.0]
            token_count += len(chunk.tokens)
            remaining = self.min_length - len(chunk.tokens)
            if remaining > 0:
                chunk.tokens += [self.id_pad] * remaining
                chunk.multipliers += [1.0] * remaining
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (text, weight) in zip(tokenized, parsed, strict=False):
            if text == "BREAK" and weight == -1:
                next_chunk()
                continue
            for token in tokens:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
        if chunk.tokens or not chunks:
            next_chunk()
        return chunks, token_count

    def __call__(self, texts):
        zs = []
        cache = {}
        self.emphasis = emphasis.get_current_option(opts.emphasis)()
        for line in texts:
            if line in cache:
                line_z_values = cache[line]
            else:
                chunks, _ = self.tokenize_line(line)
                max_tokens = max(len(c.tokens) for c in chunks)
                line_z_values = []
                for c in chunks:
                    remaining = max_tokens - len(c.tokens)
                    if remaining > 0:
                        c.tokens += [self.id_pad] * remaining
                        c.multipliers += [1.0] * remaining
                    line_z_values.append(self.process_tokens([c.tokens], [c.multipliers])[0])
                cache[line] = line_z_values
            zs.extend(line_z_values)
        return torch.stack(zs)

    def process_tokens(self, batch_tokens, batch_multipliers):
        tokens = torch.asarray(batch_tokens)
        z = self.encode_with_transformers(tokens)
        self.emphasis.tokens = batch_tokens
        self.emphasis.multipliers = torch.asarray(batch_multipliers).to(z)
        self.emphasis.z = z
        self.emphasis.after_transformers()
        return self.emphasis.z
