import * as React from 'react';

import { NSMLModel } from '../model';
import { IDataset } from '../tokens';
import { formatAge, formatBytes } from '../format';
import { IActions } from './actions';

const SCOPES: [string, string][] = [
  ['mine', 'Mine'],
  ['team', 'My teams’'],
  ['public', 'Public'],
  ['admin', 'Others (admin)']
];

/** The datasets the caller can read, by scope, and the transfers in progress. */
export function DatasetsTab(props: { model: NSMLModel; actions: IActions }): JSX.Element {
  const { model, actions } = props;
  const now = model.now();
  return (
    <div className="jp-NSML-tab jp-NSML-datasets">
      <Jobs model={model} />
      {model.datasets.length === 0 && (
        <div className="jp-NSML-empty">
          No datasets yet. Right-click a folder in the file browser: “Push to NSML as a dataset”.
        </div>
      )}
      {SCOPES.map(([scope, title]) => {
        const list = model.datasets.filter(d => d.scope === scope);
        return list.length === 0 ? null : (
          <section key={scope} aria-label={title}>
            <h3 className="jp-NSML-section">{title}</h3>
            <ul className="jp-NSML-list" aria-label={`${title} datasets`}>
              {list.map(d => (
                <DatasetRow key={d.name} dataset={d} now={now} actions={actions} />
              ))}
            </ul>
          </section>
        );
      })}
    </div>
  );
}

function DatasetRow(props: { dataset: IDataset; now: number; actions: IActions }): JSX.Element {
  const { dataset: d, actions } = props;
  const ref = d.latest !== null ? `${d.name}@${d.latest}` : d.name;
  return (
    <li className="jp-NSML-dataset" data-dataset={d.name} aria-label={d.name}>
      <div className="jp-NSML-row">
        <span className="jp-NSML-name">{d.name}</span>
        <span className="jp-NSML-version" aria-label="versions">
          {d.versions} version{d.versions === 1 ? '' : 's'}
        </span>
      </div>
      <div className="jp-NSML-facts">
        <span title="Size of the latest version">{formatBytes(d.bytes)}</span>
        <span title="Last access">used {formatAge(d.last_access, props.now)}</span>
        <span title="Sharing">
          {d.visibility}
          {d.team ? ` (${d.team})` : ''}
        </span>
        {d.scope !== 'mine' && <span title="Owner">by {d.owner}</span>}
      </div>
      <div className="jp-NSML-actions">
        <button
          className="jp-NSML-action"
          onClick={() => actions.pull(ref)}
          title={`Pull ${ref} into the current folder`}
        >
          Pull
        </button>
        {d.leaderboard && (
          <button className="jp-NSML-action" onClick={() => actions.showBoard(d.name)}>
            Leaderboard
          </button>
        )}
      </div>
    </li>
  );
}

/** Pushes, pulls and runs in progress, each with a progress bar. */
export function Jobs(props: { model: NSMLModel }): JSX.Element | null {
  const jobs = props.model.jobs;
  if (jobs.length === 0) {
    return null;
  }
  return (
    <ul className="jp-NSML-jobs" aria-label="Transfers">
      {jobs.map(j => (
        <li key={j.id} className={`jp-NSML-job jp-mod-${j.state}`}>
          <div className="jp-NSML-row">
            <span>{j.label}</span>
            <span>{j.state === 'running' ? j.phase : j.message}</span>
          </div>
          {j.state === 'running' && (
            <progress
              className="jp-NSML-progress"
              aria-label={`${j.label} progress`}
              max={1}
              value={j.fraction ?? undefined}
            />
          )}
        </li>
      ))}
    </ul>
  );
}
