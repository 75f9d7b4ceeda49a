"""How a recurrent layer is computed, behind one chooser (``paths.choose``): the reference
step loop (in ``methods.cells``), the hand-written sequence path (``sequence/``), its compiled
CPU loops (``native.py`` with ``csrc/`` beside it), the GPU kernels (``triton_steps.py``), CUDA
graphs (``graphs.py``) and the allocator settings (``memory.py``)."""
