#!/usr/bin/env bash
# Issue 22: reference behaviours as options, measured on a validation split (quick protocol, one core).
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
A="nice -n 5 .venv/bin/python benchmarks/accuracy.py --quick --workers 0 --validation 1000"
$A --rows man:16
$A --rows man:16 --set convert.aux_options.copy_init=random --tag copy-random
$A --rows auglocal:16
$A --rows auglocal:16 --set convert.aux_options.init=he --tag init-he
$A --rows mlaan:16
$A --rows mlaan:16 --set convert.aux_options.ema_twins=last --tag twins-last
$A --rows mlaan:16 --set convert.aux_options.blocks_without_own_loss=1 --tag no-loss-1
$A --rows mlaan:16 --set convert.aux_options.copy_init=backbone --tag copy-backbone
echo QUEUE3 DONE
