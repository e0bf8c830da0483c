import sys; sys.path.insert(0, "tests")
from test_cpp_runtime import _chain
import dtr
_, _, peak = _chain("dtr_eq", None)
f = dtr.policies.get("dtr_eq")
for i in range(5):
    print(_chain("dtr_eq", 0.7*peak)[1], _chain(lambda e,p,n: f(e,p,n), 0.7*peak)[1], _chain("dtr", 0.7*peak)[1], _chain("lru", 0.7*peak)[1])
