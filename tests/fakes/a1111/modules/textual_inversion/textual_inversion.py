"""Fake of modules/textual_inversion/textual_inversion.py: Embedding and the lookup the prompt
chunker uses (registration by the embedding's own tokens; longest match first). No file loading."""

from __future__ import annotations


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0
        self.filename = None
        self.hash = None
        self.shorthash = None


class EmbeddingDatabase:
    def __init__(self):
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.embedding_dirs = {}

    def add_embedding_dir(self, path):
        if path is not None:
            self.embedding_dirs[path] = path

    def register_embedding(self, embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding, model, name):
        ids = model.cond_stage_model.tokenize([name])[0]
        first = ids[0]
        lookup = [x for x in self.ids_lookup.get(first, []) if x[1].name != name]
        lookup.append((ids, embedding))
        self.ids_lookup[first] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)
        self.word_embeddings[name] = embedding
        return embedding

    def load_textual_inversion_embeddings(self, force_reload=False):
        pass

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], ()):
            if tokens[offset : offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None
