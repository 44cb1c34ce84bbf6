"""Model-level tools that tune early exits for a model never trained for them.

Exit adapters (:mod:`earlyexit.tuning.adapters`), threshold calibration (:mod:`earlyexit.tuning.calibrate`),
teacher-forced hidden states (:mod:`earlyexit.tuning.teacher_forcing`), download-free text
(:mod:`earlyexit.tuning.text_data`) and exact mode's frequency-ranked draft vocabulary
(:mod:`earlyexit.tuning.draft_vocab`); position-schedule calibration
(:mod:`earlyexit.tuning.schedule_calibration`). They use the ops and the HF model adapter; the ops never use them.
"""
