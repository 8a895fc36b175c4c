export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "from fasthug_patch.bench import checkpoints as c; print(c.cached_checkpoint('llama','3b','bf16',shard_size='2GB',progress=False))" > /tmp/p 2>/dev/null; P=$(tail -1 /tmp/p); echo $P
S="import json,sys
for l in sys.stdin:
  if l.startswith('{'): d=json.loads(l); print(sys.argv[1], d['mode'], 'ready', round(d['ready_s'],3), (d.get('fasthug') or {}).get('summary'))"
T="python3 fasthug_patch/bench/trial.py --path $P --dtype bf16 --device cuda"
timeout 60 $T --mode stock 2>/dev/null | python3 -c "$S" warm
timeout 60 python3 -c "import faulthandler,sys,runpy; faulthandler.dump_traceback_later(40, exit=True); sys.argv=['t','--mode','patched','--path','$P','--dtype','bf16','--device','cuda']; sys.path.insert(0,'fasthug_patch/bench'); runpy.run_path('fasthug_patch/bench/trial.py', run_name='__main__')" > /tmp/o 2>/tmp/e; python3 -c "$S" pinned < /tmp/o; grep -E "File|Thread" /tmp/e | head -50
for i in 1 2; do for m in stock patched; do FASTHUG_PIN_FILES=0 timeout 60 $T --mode $m 2>/dev/null | python3 -c "$S" ring; done; done
