"""The paper's studies as commands: parameter allocation (`allocation`) and transfer with little data
(`transfer`). Each trains many small rows on the training package, writes a resumable JSON results file
after every row, and reports a Markdown table and a PNG plot."""
