"""relprop as an Inseq attribution method: `import relprop.integrations.inseq`, then
`inseq.load_model(model, "relprop", tokenizer=tok).attribute(prompt)`.

Inseq finds its methods by subclass (every FeatureAttribution subclass with a
`method_name` is one), so defining RelpropAttribution registers "relprop". Inseq keeps its
loop: it generates, then calls `attribute_step` once per generated token with the prefix
before it; each step is one relprop explanation (one forward, one backward) of that
token's logit at the last position, over every token of the prefix. That is the row
relprop.explain_generation computes for the token, so the two agree.

Keywords of `load_model` reach relprop's Explainer (`method.explainer`): `composite=`
("attnlrp" by default, as for generation; a name or a relprop Composite), the composite's
parameters (`epsilon=`, ...) and `record=True` (ledgers kept). What is explained is the
generated token's logit, as in relprop: Inseq's `attributed_fn` is "logit" (the model's
default while this method is hooked) and any other is refused. Scores are one per token,
signed and unnormalised (Inseq's coarse output: no aggregation), so a column sums to what
reached the input, as relprop's ledger books it. Decoder-only models only: for Inseq's
encoder-decoder models relprop would treat the decoder's tokens as constants.

Inseq is optional (installed with `pip install --no-deps inseq==0.7.1 jaxtyping
treescope wadler-lindig`: its declared CUDA 11 wheels and typeguard pin are not needed).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import InputError, MissingDependencyError
from ..explain import Explainer
from ..generation import mask_keywords

try:
    from inseq.attr.attribution_decorators import set_hook, unset_hook
    from inseq.attr.feat import FeatureAttribution
    from inseq.attr.step_functions import get_step_function
    from inseq.data import CoarseFeatureAttributionStepOutput
except ImportError as exc:  # pragma: no cover - exercised by the test with inseq hidden
    raise MissingDependencyError(
        "relprop.integrations.inseq needs Inseq, which is not installed: pip install "
        "--no-deps inseq==0.7.1 jaxtyping==0.3.11 wadler-lindig==0.1.8 treescope==0.1.10"
    ) from exc

__all__ = ["METHOD", "RelpropAttribution"]

METHOD = "relprop"


class RelpropAttribution(FeatureAttribution):
    """Inseq's "relprop" method: one relprop explanation per generated token.

    `composite` and its parameters build one relprop.Explainer for the wrapped model,
    traced once and reused for every step and call."""

    method_name = METHOD

    def __init__(self, attribution_model: Any, composite: Any = "attnlrp",
                 **params: Any) -> None:
        if attribution_model.is_encoder_decoder:
            raise InputError("relprop's Inseq method explains decoder-only models; this "
                             "encoder-decoder model's decoder tokens would be constants")
        self.explainer = Explainer(attribution_model.model, composite, **params)
        self._previous_fn: str | None = None
        super().__init__(attribution_model)
        # the prefix's token ids, not embeddings: relprop explains ids through the lookup
        self.attribute_batch_ids = True
        self.forward_batch_embeds = False

    @set_hook
    def hook(self, **kwargs: Any) -> None:
        """While hooked, the model's default attributed function is the logit, as relprop's
        (Inseq's own default, the probability, is restored by `unhook`)."""
        model = self.attribution_model
        self._previous_fn = model.default_attributed_fn_id
        # inseq 0.7.1 names the property's setter `set_attributed_fn`: it cannot be assigned
        model._default_attributed_fn_id = "logit"

    @unset_hook
    def unhook(self, **kwargs: Any) -> None:
        if self._previous_fn is not None:
            self.attribution_model._default_attributed_fn_id = self._previous_fn
            self._previous_fn = None

    def attribute_step(self, attribute_fn_main_args: dict[str, Any],
                       attribution_args: dict[str, Any] | None = None
                       ) -> CoarseFeatureAttributionStepOutput:
        """The relevance (B, t) of the prefix (B, t) for the logit of each sample's next
        token at its last position."""
        ids, target_ids, attributed_fn, mask = attribute_fn_main_args[
            "additional_forward_args"][:4]
        _check_logit(attributed_fn)
        position = ids.shape[1] - 1
        wanted = [(position, int(t)) for t in target_ids.reshape(-1).tolist()]
        # a mask of ones changes nothing: without it, the program explain_generation uses
        keywords = {} if mask is None or bool(mask.all()) else \
            mask_keywords(self.explainer.model, mask)
        expl = self.explainer(ids, target=wanted, forward_kwargs=keywords)
        relevance: Tensor = expl.relevance
        return CoarseFeatureAttributionStepOutput(source_attributions=None,
                                                  target_attributions=relevance.detach(),
                                                  step_scores={})


def _check_logit(attributed_fn: Any) -> None:
    """LRP explains a logit; Inseq's other targets (probability, entropy, contrasts) are not
    what relprop's relevance conserves."""
    if attributed_fn is not get_step_function("logit"):
        got = getattr(attributed_fn, "__name__", repr(attributed_fn))
        raise InputError(f"relprop explains the generated token's logit (attributed_fn="
                         f"'logit', the default with this method), not {got}")
