"""Applications of a trained CART model, all training-free (paper, "Other Applications"):

- :mod:`~cartlib.apps.highres` — high resolution by patchwise details (Figure 6, Table 2);
- :mod:`~cartlib.apps.superres` — super-resolution by token prefix (Figure 7, Table 3);
- :mod:`~cartlib.apps.edit` — recolouring (Figure 8), lighting control (Figure 9), inpainting.
"""
