"""Tool-integrated reasoning: sandbox, chat format, rollouts, grading and tasks."""
