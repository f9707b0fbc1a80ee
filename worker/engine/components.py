"""Every built-in component, registered: import this module for the full registries.

Teacher runtimes and student architectures register themselves by decorator
where they are defined. The modules that add to a registry defined in another
module (the Hugging Face runtime and student) are imported here, in one place,
so no registry's module has to import its own extensions. The pipeline imports
this module, as does any caller that looks a component up by name without it.
"""

from worker.engine import students, teachers
from worker.engine.hf import runtime as hf_runtime
from worker.engine.hf import student as hf_student

#: Every module that registers built-in teacher runtimes or student architectures.
BUILT_IN_MODULES = (teachers, hf_runtime, students, hf_student)

#: The registries, complete once this module is imported.
TEACHER_RUNTIMES = teachers.TEACHER_RUNTIMES
STUDENTS = students.STUDENTS
