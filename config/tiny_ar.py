# The autoregressive baseline at tiny scale: the network of config/tiny_mdlm.py with causal attention and the
# next-token loss; also the offline gen-PPL judge of e2e.py.
# Data (once, ~5 s):
#   python prepare_data.py --source=corpus --tokenizer=byte --row_len=128 --out_dir=data/corpus_byte
# Run (from the repo root):
#   python distill.py config/tiny_ar.py
#   torchrun --standalone --nproc_per_node=2 distill.py config/tiny_ar.py
exec(open('config/tiny_mdlm.py').read())
objective = 'ar'
out_dir = 'out/tiny_ar'
