"""Text generation: causal language models from a Hugging Face folder, decoded step by step.

- ``decoder``: a Llama-family decoder (Llama, Mistral, Qwen2) with a static KV cache of
  ``max_batch`` slots x ``max_context`` positions; one forward is one prompt chunk or one decode
  step, so each is one ``infer`` on a DEPLOYED backend;
- ``folder``: read and check a causal-LM folder and load its weights into the decoder;
- ``sampling``: greedy, temperature, top-k, top-p, seeded;
- ``text``: incremental detokenization (whole UTF-8 pieces) and stop strings across token boundaries;
- ``engine``: the loop around the backend: prompt chunks, decode steps, sampling, stopping, streaming;
- ``batcher``: continuous batching: requests join and leave the running decode batch between steps;
- ``service``: a call of TorchServe's continuous batching as one batcher step, each request in its protocol;
- ``request``: a request's JSON, checked (400s naming the field);
- ``gate``: the accuracy gate for generation (teacher-forced top-1 agreement and KL against fp32);
- ``prepare``: archive time.

The engine and the batcher own the loop; the backend owns the math; the handler only connects TorchServe's
requests and streaming responses to them.
"""
