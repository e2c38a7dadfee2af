"""What a selector may be told beyond the patch features: the one context object of
``select(features, budget, *, context=None)``. It lives in ``common/`` because both the selectors
and the VLM-family wing (``vlms/``), which builds it for query-aware selectors, use it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SelectionContext:
    """What a selector may need beyond the patch features; every field is optional.

    - ``cls_attention``: ``(B, N)`` the frozen encoder's CLS->patch attention
      (``FeatureBatch.cls_attention``, filled when ``data.cls_attention_layer`` is set).
    - ``instruction``: the instruction (question) of each row, as text; ``B`` strings.
    - ``instruction_embedding``: ``(B, D)`` or ``(B, M, D)`` the instruction embedded by a text
      model (``M`` segments or tokens), where the caller has one: in ``make eval`` the text tower
      of an ``open_clip:`` encoder; in a pruned VLM (``vlms/``) the mean of the LLM's input
      embeddings of the question's tokens.
    - ``token_embedding``: ``(B, N, D)`` the image tokens in the instruction embedding's space,
      which relevance compares against (``make eval``: the patch features through the encoder's
      own image head; a pruned VLM: the candidates projected into the LLM's input space).
      ``None``: the features are already in that space.

    A selector whose rule reads the instruction declares it with ``SelectorNet.uses_instruction``.
    """

    cls_attention: Optional[torch.Tensor] = None
    instruction: Optional[list[str]] = None
    instruction_embedding: Optional[torch.Tensor] = None
    token_embedding: Optional[torch.Tensor] = None

    def take(self, rows: torch.Tensor) -> "SelectionContext":
        """The context of batch rows ``rows`` (a 1-D index tensor), every field alike."""
        def cut(x):
            return None if x is None else x[rows.to(x.device)]

        instruction = None if self.instruction is None else [self.instruction[i] for i in rows.tolist()]
        return SelectionContext(cut(self.cls_attention), instruction, cut(self.instruction_embedding),
                                cut(self.token_embedding))
