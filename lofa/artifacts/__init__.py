"""Every trained artifact, loaded and saved in one place, with one error type (``lofa.io.ArtifactError``).

One module per kind of artifact, so that a stage imports only the kinds it reads or writes
(``dvc.yaml``'s code deps are each stage's import closure, and a dep that changes reruns the stage:
``fit_loras`` must not depend on the hypernetwork's code):

- :mod:`lofa.artifacts.base`: the base DiT, ``<base>/dit.safetensors`` + ``dit.json`` (``pretrain_base``
  writes them, every later stage and ``lofa`` command reads them).
- :mod:`lofa.artifacts.loras`: the fitted LoRAs of ``fit_loras`` (``<out>/loras/<clip>.safetensors`` and
  ``<out>/curves/<clip>.json``), the LoRA sets the hypernetwork stages train on, and user LoRA files
  checked against a base model. The file format itself is :mod:`lofa.lora` and :mod:`lofa.lora_formats`.
- :mod:`lofa.artifacts.judge`: the synthetic profile's judge, ``<judge>/judge.safetensors`` + ``judge.json``
  (``train_judge`` writes them; ``evaluate`` and ``lofa score`` read them).
- :mod:`lofa.artifacts.hypernets`: the stage-I and stage-II hypernetworks, ``<stage>/model.safetensors`` +
  ``model.json`` (exported at the end of :func:`lofa.train.train`, with the sidecar
  ``meta`` of :func:`lofa.artifacts.hypernets.hypernet_meta`).

Errors name the file and the problem and are :class:`lofa.io.ArtifactError` (``LoRAFormatError``, a
LoRA file that does not fit, is one). This package holds no code of its own.
"""
