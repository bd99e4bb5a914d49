"""Other projects' released weights as finished stages of a cartlib run.

The converters themselves live beside what they convert (VAR's VQ-VAE in
:mod:`cartlib.tokenizer.var_layout`, its transformer in :mod:`cartlib.model.var_import`); this
package, a layer above training, writes their results into a run directory (:mod:`.var`)."""
