"""Model-level tools that tune early exits for a model never trained for them.

Exit adapters (:mod:`earlyexit.tuning.adapters`), threshold calibration (:mod:`earlyexit.tuning.calibrate`),
teacher-forced hidden states (:mod:`earlyexit.tuning.teacher_forcing`) and download-free text
(:mod:`earlyexit.tuning.text_data`). They use the ops and the HF model adapter; the ops never use them.
"""
