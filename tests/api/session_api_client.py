"""A session API client as the original service's own test script drives it: `requests`, a form for
/start_session, JSON for /execute, the same sequence (a print, a function, a variable kept between calls,
then the Titanic analysis that reads a CSV from /mnt/data with pandas, plots it with matplotlib and saves
the plot to /mnt/data/output/output.png), and the packages the original's environment had.

Usage: python session_api_client.py BASE_URL USER_ID. Prints one JSON object: each call's status and body.
"""

import json
import sys

import requests

BASE, USER = sys.argv[1], sys.argv[2]


def start_session(user_id):
    response = requests.post(f"{BASE}/start_session", data={"user_id": user_id}, timeout=300)
    return response.status_code, response.json()


def execute_code(user_id, code):
    response = requests.post(f"{BASE}/execute", json={"user_id": user_id, "code": code}, timeout=300)
    return response.status_code, response.json()


GREET = '''
def greet(name):
    print(f"Hello, {name}!")

greet("World")
'''

# The original script's analysis (without its one stray `,` line, a SyntaxError in any Python).
TITANIC = '''import pandas as pd

# Load the Titanic dataset
file_path = "/mnt/data/titanic.csv"
data = pd.read_csv(file_path)
print("Data loaded successfully.")
survival_count = data.groupby(["Sex", "Survived"]).size().unstack(fill_value=0)
print("Survival counts calculated:{survival_count}")
import matplotlib.pyplot as plt

# Create a plot of survival counts by sex
survival_count.plot(kind="bar", stacked=True)
plt.title("Survived vs Dead by Sex")
plt.xlabel("Sex")
plt.ylabel("Number of Passengers")
plt.xticks(rotation=0)
plt.legend(["Did not survive", "Survived"])
plt.tight_layout()
output_file_path = "/mnt/data/output/output.png"
plt.savefig(output_file_path)

print(survival_count)
print(f"Plot saved at: {output_file_path}")
'''

# The rest of the original's environment, used for real: Parquet through pyarrow, xlsx through openpyxl,
# a Markdown table through tabulate; xlrd (it only reads legacy .xls) imported.
FORMATS = '''import os
import pyarrow, tabulate, openpyxl, xlrd, seaborn, sklearn, scipy
data.to_parquet("/mnt/data/output/titanic.parquet")
os.makedirs("/mnt/data/output/tables", exist_ok=True)
data.to_excel("/mnt/data/output/tables/titanic.xlsx")
back = pd.read_parquet("/mnt/data/output/titanic.parquet")
sheet = pd.read_excel("/mnt/data/output/tables/titanic.xlsx", index_col=0)
print(len(back), len(sheet), pyarrow.__version__, xlrd.__version__)
print(survival_count.to_markdown())
'''

results = {"start": start_session(USER)}
results["simple"] = execute_code(USER, 'print("Simple test")')
results["function"] = execute_code(USER, GREET)
results["set"] = execute_code(USER, "x = 42")
results["get"] = execute_code(USER, 'print(f"The value of x is {x}")')
results["titanic"] = execute_code(USER, TITANIC)
results["formats"] = execute_code(USER, FORMATS)
print(json.dumps(results))
